// Symmetric per-row INT8 quantization of bf16 weights at load time, bit-identical to
// src/quant.rs: scale = absmax / 127, q = clamp(round(w / scale), -127, 127), IEEE f32 division,
// rounding half away from zero; a zero row has scale 0 and zero values.
#include "common.cuh"

namespace {

constexpr int kThreads = 256;

// One block per row: the row's absmax, then every value.
__global__ void __launch_bounds__(kThreads) quantize_kernel(int8_t *values, float *scales, const bi_bf16 *w, int k) {
    __shared__ float warp_max[kThreads / bi::kWarp];
    const size_t row = blockIdx.x;
    const bi_bf16 *src = w + row * k;
    float absmax = 0.0f;
    for (int i = threadIdx.x; i < k; i += kThreads) absmax = fmaxf(absmax, fabsf(bi::bf16_to_f32(src[i])));
    absmax = bi::warp_max(absmax);
    if (threadIdx.x % bi::kWarp == 0) warp_max[threadIdx.x / bi::kWarp] = absmax;
    __syncthreads();
    absmax = 0.0f;
#pragma unroll
    for (int i = 0; i < kThreads / bi::kWarp; ++i) absmax = fmaxf(absmax, warp_max[i]);
    const float scale = __fdiv_rn(absmax, 127.0f);
    if (threadIdx.x == 0) scales[row] = scale;
    for (int i = threadIdx.x; i < k; i += kThreads) {
        const float q = scale == 0.0f ? 0.0f : fminf(fmaxf(roundf(__fdiv_rn(bi::bf16_to_f32(src[i]), scale)), -127.0f), 127.0f);
        values[row * k + i] = static_cast<int8_t>(q);
    }
}

}  // namespace

extern "C" cudaError_t bi_quantize_int8(int8_t *values, float *scales, const bi_bf16 *w, int n, int k, cudaStream_t stream) {
    if (values == nullptr || scales == nullptr || w == nullptr || n <= 0 || k <= 0) return cudaErrorInvalidValue;
    quantize_kernel<<<n, kThreads, 0, stream>>>(values, scales, w, k);
    return cudaGetLastError();
}
