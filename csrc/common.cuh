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

// The error of the launch just made (configuration errors), without synchronizing.
inline cudaError_t launch_status() { return cudaGetLastError(); }

}  // namespace bi
