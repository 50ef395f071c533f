// Device helpers shared by the kernel files: bf16 <-> f32 and block-wide reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include "braidinfer.h"

namespace bi {

constexpr int kWarp = 32;

__device__ __forceinline__ float bf16_to_f32(bi_bf16 bits) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

__device__ __forceinline__ bi_bf16 f32_to_bf16(float value) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(value));
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
        value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}

// Sum over the whole block; every thread gets the result. `scratch` holds one float per warp.
__device__ __forceinline__ float block_sum(float value, float *scratch) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int warps = (blockDim.x + kWarp - 1) / kWarp;
    value = warp_sum(value);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    value = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(value);
}

// Synchronizes the block's first `Warps` warps with named barrier 1: the whole block in the
// attention kernel, every warp but the copy warp in the fused layer kernel.
template <int Warps>
__device__ __forceinline__ void sync_warps() {
    asm volatile("bar.sync 1, %0;\n" ::"n"(Warps * kWarp) : "memory");
}

// Programmatic dependent launch (sm_90): kernels are launched allowed to start before the
// previous kernel on the stream finishes (all but the skinny LM head: `Start`). A kernel
// signals at its start that the next may launch, does work that needs no earlier result
// (weight loads), then waits for the previous kernel to complete before touching anything it
// wrote. Every block waits before it exits, so completion stays transitive along the stream.
__device__ __forceinline__ void allow_next_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_previous_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// The SM count of the current device.
inline cudaError_t multiprocessors(int &sms) {
    int device = 0;
    const cudaError_t e = cudaGetDevice(&device);
    return e != cudaSuccess ? e : cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
}

inline cudaError_t l2_bytes(int &bytes) {
    int device = 0;
    const cudaError_t e = cudaGetDevice(&device);
    return e != cudaSuccess ? e : cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, device);
}

// Whether the current device is compute capability 9.0 (sm_90a code runs there only).
inline cudaError_t is_hopper(bool &hopper) {
    int device = 0, major = 0, minor = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    hopper = major == 9 && minor == 0;
    return e;
}

// When a kernel may start: early, by programmatic dependent launch (its blocks are placed as the
// previous kernel's leave and run the prologue before `wait_for_previous_kernel`), or after the
// previous kernel (stream order; the wait then returns at once).
enum class Start { kEarly, kAfterPrevious };

// Launches `kernel` in clusters of `cluster` blocks (1 x 1 x 1: none) and returns the launch error.
template <typename... Params, typename... Args>
inline cudaError_t launch_from(Start start, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                               cudaStream_t stream, dim3 cluster, Args... args) {
    cudaLaunchAttribute attribute[2];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = start == Start::kEarly;
    attribute[1].id = cudaLaunchAttributeClusterDimension;
    attribute[1].val.clusterDim.x = cluster.x;
    attribute[1].val.clusterDim.y = cluster.y;
    attribute[1].val.clusterDim.z = cluster.z;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attribute;
    config.numAttrs = cluster.x * cluster.y * cluster.z > 1 ? 2 : 1;
    return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

template <typename... Params, typename... Args>
inline cudaError_t launch_clustered(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                    dim3 cluster, Args... args) {
    return launch_from(Start::kEarly, kernel, grid, block, smem, stream, cluster, args...);
}

template <typename... Params, typename... Args>
inline cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
    return launch_clustered(kernel, grid, block, smem, stream, dim3(1, 1, 1), args...);
}

}  // namespace bi
