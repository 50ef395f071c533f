// RMSNorm of f32 residual rows into bf16 activations (the input of the next matrix product).
#include "common.cuh"

namespace {

constexpr int kThreads = 256;

// grid: one block per row.
__global__ void rmsnorm_kernel(bi_bf16 *__restrict__ out, const float *__restrict__ x,
                               const bi_bf16 *__restrict__ weight, int hidden, float eps) {
    __shared__ float scratch[kThreads / bi::kWarp];
    bi::allow_next_kernel();
    bi::wait_for_previous_kernel();
    const float *row = x + static_cast<size_t>(blockIdx.x) * hidden;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) sum_sq += row[i] * row[i];
    const float inv_rms = rsqrtf(bi::block_sum(sum_sq, scratch) / hidden + eps);
    bi_bf16 *dst = out + static_cast<size_t>(blockIdx.x) * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        dst[i] = bi::f32_to_bf16(row[i] * inv_rms * bi::bf16_to_f32(weight[i]));
}

}  // namespace

extern "C" cudaError_t bi_rmsnorm(bi_bf16 *out, const float *x, const bi_bf16 *weight, int m,
                                  int hidden, float eps, cudaStream_t stream) {
    if (m <= 0 || hidden <= 0) return cudaErrorInvalidValue;
    return bi::launch(rmsnorm_kernel, dim3(m), dim3(kThreads), 0, stream, out, x, weight, hidden, eps);
}
