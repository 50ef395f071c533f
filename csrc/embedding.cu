// Embedding gather into the f32 residual stream.
#include "common.cuh"

namespace {

constexpr int kThreads = 256;

// grid: one block per row m.
__global__ void embedding_kernel(float *__restrict__ x, const bi_bf16 *__restrict__ table,
                                 const int32_t *__restrict__ tokens, int hidden, int vocab) {
    const int row = blockIdx.x;
    bi::allow_next_kernel();
    bi::wait_for_previous_kernel();
    const int token = tokens[row];
    const bool valid = token >= 0 && token < vocab;
    const bi_bf16 *src = table + static_cast<size_t>(valid ? token : 0) * hidden;
    float *dst = x + static_cast<size_t>(row) * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        dst[i] = valid ? bi::bf16_to_f32(src[i]) : 0.0f;
}

}  // namespace

extern "C" cudaError_t bi_embedding(float *x, const bi_bf16 *table, const int32_t *tokens,
                                    int m, int hidden, int vocab, cudaStream_t stream) {
    if (m <= 0 || hidden <= 0 || vocab <= 0) return cudaErrorInvalidValue;
    return bi::launch(embedding_kernel, dim3(m), dim3(kThreads), 0, stream, x, table, tokens, hidden, vocab);
}
