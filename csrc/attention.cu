// Causal GQA attention over the paged KV cache, split along the sequence (flash-decoding):
// blocks of `split_kernel` each cover one range of positions for one kv head (both of its query
// heads, so every K/V row is read once); the last block of a (row, kv head) to finish merges
// the ranges (a completion counter instead of a second launch).
// The same kernel serves decode (one row per sequence) and prefill (one row per prompt token).
// Scores come from the tensor core, P.V from FMAs with lane l owning dims 4l..4l+3: see
// attention.cuh.
#include "attention.cuh"

namespace {

using namespace bi::attn;
// 8 warps per block, so that two blocks share an SM (125 registers per thread) and one block's
// loads are in flight while another merges: 16-warp blocks, one per SM, reached 78% of the copy
// bandwidth at batch 256, context 512 (H200).
using Attention = Core<8>;

// grid (kv heads, rows, splits).
__global__ void __launch_bounds__(8 * bi::kWarp)
    split_kernel(Args args, const bi_bf16 *__restrict__ q, const int32_t *__restrict__ positions,
                 const int32_t *__restrict__ row_seq, const int32_t *__restrict__ block_tables, int max_blocks) {
    const int kv_head = blockIdx.x, row = blockIdx.y, split = blockIdx.z;
    bi::allow_next_kernel();
    bi::wait_for_previous_kernel();
    const int pos = positions[row];
    if (pos < 0) {  // padding row: zeros
        if (split == 0)
            for (int i = threadIdx.x; i < kGroup * BI_HEAD_DIM; i += blockDim.x)
                args.out[(static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup) * BI_HEAD_DIM + i] = 0;
        return;
    }
    const int32_t *table = block_tables + static_cast<size_t>(row_seq[row]) * max_blocks;
    const Round first = Attention::first_round(args, table, kv_head, split, gridDim.z, pos);
    QueryFragments qa;
    load_query(qa, q + (static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup) * BI_HEAD_DIM);
    __shared__ float smem[Attention::kSmemFloats];
    Attention::attend_split<true>(args, row, kv_head, split, gridDim.z, pos, table, qa, first, smem);
}

}  // namespace

extern "C" cudaError_t bi_attention(bi_bf16 *out, float *partials, int32_t *counters, const bi_bf16 *q,
                                    const bi_bf16 *k_cache, const bi_bf16 *v_cache, const int32_t *positions,
                                    const int32_t *row_seq, const int32_t *block_tables, int m, int max_blocks,
                                    int splits, cudaStream_t stream) {
    if (m <= 0 || max_blocks <= 0 || splits <= 0 || splits > BI_MAX_SPLITS) return cudaErrorInvalidValue;
    const Args args{out, partials, counters, k_cache, v_cache};
    return bi::launch(split_kernel, dim3(BI_KV_HEADS, m, splits), dim3(8 * bi::kWarp), 0, stream, args, q, positions,
                      row_seq, block_tables, max_blocks);
}
