// Per-head RMSNorm of q and k (Qwen3's q_norm / k_norm), rotate-half RoPE, and the write of
// k and v into the paged KV cache.
#include "common.cuh"

namespace {

constexpr int kWarps = 8;
constexpr int kHalf = BI_HEAD_DIM / 2;
constexpr int kQWidth = BI_Q_HEADS * BI_HEAD_DIM, kKvWidth = BI_KV_HEADS * BI_HEAD_DIM;
// Each lane owns dims {2l, 2l+1} and their rotation partners {64+2l, 64+2l+1}.
static_assert(kHalf == 2 * bi::kWarp, "a warp covers one head with 4 values per lane");

// grid: one block per row; warp w handles heads w, w+8, ... of the 16 q, 8 k and 8 v heads.
__global__ void __launch_bounds__(kWarps * bi::kWarp)
    qk_norm_rope_kernel(bi_bf16 *__restrict__ q_out, bi_bf16 *__restrict__ k_cache, bi_bf16 *__restrict__ v_cache,
                        const float *__restrict__ qkv, const bi_bf16 *__restrict__ q_norm,
                        const bi_bf16 *__restrict__ k_norm, const float *__restrict__ rope_inv_freq,
                        const int32_t *__restrict__ positions, const int32_t *__restrict__ row_seq,
                        const int32_t *__restrict__ block_tables, int max_blocks, float eps) {
    const int row = blockIdx.x, warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp;
    bi::allow_next_kernel();
    bi::wait_for_previous_kernel();
    const int pos = positions[row];
    if (pos < 0) return;  // padding row
    const int block = block_tables[static_cast<size_t>(row_seq[row]) * max_blocks + pos / BI_BLOCK_TOKENS];
    const int slot = pos % BI_BLOCK_TOKENS;
    const float *src_row = qkv + static_cast<size_t>(row) * (kQWidth + 2 * kKvWidth);
    const int d0 = 2 * lane, d1 = kHalf + 2 * lane;

    float cos_[2], sin_[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) sincosf(static_cast<float>(pos) * rope_inv_freq[d0 + j], &sin_[j], &cos_[j]);

    for (int head = warp; head < BI_Q_HEADS + 2 * BI_KV_HEADS; head += kWarps) {
        const float *src = src_row + head * BI_HEAD_DIM;  // q heads, then k heads, then v heads
        const float2 lo = *reinterpret_cast<const float2 *>(src + d0);
        const float2 hi = *reinterpret_cast<const float2 *>(src + d1);
        bi_bf16 *dst;
        if (head < BI_Q_HEADS) {
            dst = q_out + (static_cast<size_t>(row) * BI_Q_HEADS + head) * BI_HEAD_DIM;
        } else {
            const bool is_v = head >= BI_Q_HEADS + BI_KV_HEADS;
            const int kv_head = (head - BI_Q_HEADS) % BI_KV_HEADS;
            dst = (is_v ? v_cache : k_cache) +
                  ((static_cast<size_t>(block) * BI_KV_HEADS + kv_head) * BI_BLOCK_TOKENS + slot) * BI_HEAD_DIM;
            if (is_v) {
                dst[d0] = bi::f32_to_bf16(lo.x), dst[d0 + 1] = bi::f32_to_bf16(lo.y);
                dst[d1] = bi::f32_to_bf16(hi.x), dst[d1 + 1] = bi::f32_to_bf16(hi.y);
                continue;
            }
        }
        const bi_bf16 *norm = head < BI_Q_HEADS ? q_norm : k_norm;
        const float inv_rms =
            rsqrtf(bi::warp_sum(lo.x * lo.x + lo.y * lo.y + hi.x * hi.x + hi.y * hi.y) / BI_HEAD_DIM + eps);
        const float a[2] = {lo.x * inv_rms * bi::bf16_to_f32(norm[d0]), lo.y * inv_rms * bi::bf16_to_f32(norm[d0 + 1])};
        const float b[2] = {hi.x * inv_rms * bi::bf16_to_f32(norm[d1]), hi.y * inv_rms * bi::bf16_to_f32(norm[d1 + 1])};
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            dst[d0 + j] = bi::f32_to_bf16(a[j] * cos_[j] - b[j] * sin_[j]);
            dst[d1 + j] = bi::f32_to_bf16(b[j] * cos_[j] + a[j] * sin_[j]);
        }
    }
}

}  // namespace

extern "C" cudaError_t bi_qk_norm_rope_cache(bi_bf16 *q, bi_bf16 *k_cache, bi_bf16 *v_cache, const float *qkv,
                                             const bi_bf16 *q_norm, const bi_bf16 *k_norm,
                                             const float *rope_inv_freq, const int32_t *positions,
                                             const int32_t *row_seq, const int32_t *block_tables, int m,
                                             int max_blocks, float eps, cudaStream_t stream) {
    if (m <= 0 || max_blocks <= 0) return cudaErrorInvalidValue;
    return bi::launch(qk_norm_rope_kernel, dim3(m), dim3(kWarps * bi::kWarp), 0, stream, q, k_cache, v_cache, qkv, q_norm,
                      k_norm, rope_inv_freq, positions, row_seq, block_tables, max_blocks, eps);
}
