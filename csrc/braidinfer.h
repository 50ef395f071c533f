/* braidinfer: the one C header between the CUDA C++ kernels and the Rust host runtime.
 *
 * Every entry point is `cudaError_t bi_<op>(outputs..., inputs..., dims..., stream)`: it launches
 * on the given stream (never the legacy null stream), never exits, and returns the launch error.
 * Tensors are row-major; shapes are in the comments. bf16 values cross the ABI as raw uint16_t
 * bits (`bi_bf16`). The residual stream is f32.
 */
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef uint16_t bi_bf16;

/* Human-readable text of a CUDA error code (static storage). */
const char *bi_error_string(cudaError_t error);

/* x[m, :] = f32(table[tokens[m], :]); tokens outside [0, vocab) write zeros.
 * x: [m, hidden] f32; table: [vocab, hidden] bf16; tokens: [m] int32. */
cudaError_t bi_embedding(float *x, const bi_bf16 *table, const int32_t *tokens, int m,
                         int hidden, int vocab, cudaStream_t stream);

/* out[r, :] = bf16(x[r, :] / rms(x[r, :]) * weight), rms = sqrt(mean(x^2) + eps), f32 math.
 * out: [m, hidden] bf16; x: [m, hidden] f32; weight: [hidden] bf16. */
cudaError_t bi_rmsnorm(bi_bf16 *out, const float *x, const bi_bf16 *weight, int m, int hidden,
                       float eps, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
