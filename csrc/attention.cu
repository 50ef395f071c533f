// Causal GQA attention over the paged KV cache, split along the sequence (flash-decoding):
// blocks of `split_kernel` each cover one range of positions for one kv head (both of its query
// heads, so every K/V row is read once); the last block of a (row, kv head) to finish merges
// the ranges (a completion counter instead of a second launch).
// The same kernel serves rows whose q bi_qk_norm_rope_cache prepared (decode chains of more
// than 16 rows; a prompt's rows go to prefill_attention.cu) and, as bi_decode_attention, decode rows
// that it prepares itself (one row per sequence: each block normalizes and rotates its query
// heads from the qkv product, and the range that ends at the row's position writes the row's
// new K/V, which no other row reads; one launch fewer per layer; src/gpu/forward.rs says where
// it pays). Scores come from the tensor core, P.V from FMAs with lane l owning dims 4l..4l+3:
// see attention.cuh.
#include "attention.cuh"

namespace {

using namespace bi::attn;
// 8 warps per block, so that two blocks share an SM and one block's loads are in flight while
// another merges: 16-warp blocks, one per SM, reached 78% of the copy bandwidth at batch 256,
// context 512 (H200).
using Attention = Core<8>;

// One block per item (kv head, row, range), kv head fastest, on a one-dimensional grid. Written
// as a loop over items (which runs once) because that form compiles to 116 registers instead of
// 124, and against one block per item on the former three-dimensional grid (kv head, row, range)
// the sweep at batch 32 / 64 / 128 / 256 ran 1.8 / 1.1 / 3.4 / 3.3% faster with it (same run),
// without the loop 0.5 / 0.5 / 1.1 / 1.3% (context 512, H200). A grid capped at 4 blocks per SM
// looping over more items ran the decode sweep as fast, and prefill (rows of unequal lengths,
// dealt out in turn) slower: a 2,000-token prompt at 43,473-43,700 tok/s against 45,322.
// Decode: q is unused, prep holds the qkv product.

template <bool Decode>
__global__ void __launch_bounds__(8 * bi::kWarp)
    split_kernel(Args args, Prep prep, const bi_bf16 *__restrict__ q, const int32_t *__restrict__ positions,
                 const int32_t *__restrict__ row_seq, const int32_t *__restrict__ block_tables, int max_blocks, int m,
                 int splits) {
    __shared__ __align__(16) float smem[Attention::kSmemFloats];  // 16: the staged query heads are read as uint4
    bi::allow_next_kernel();
    bi::wait_for_previous_kernel();
    for (int item = blockIdx.x; item < BI_KV_HEADS * m * splits; item += gridDim.x) {
        const int kv_head = item % BI_KV_HEADS, row = item / BI_KV_HEADS % m, split = item / (BI_KV_HEADS * m);
        const int pos = positions[row];
        if (pos < 0) {  // padding row: zeros
            if (split == 0)
                for (int i = threadIdx.x; i < kGroup * BI_HEAD_DIM; i += blockDim.x)
                    args.out[(static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup) * BI_HEAD_DIM + i] = 0;
            continue;
        }
        const int active = Attention::split_range(pos, split, splits).active;
        if (split >= active) continue;  // a short context uses fewer ranges
        const int32_t *table = block_tables + static_cast<size_t>(row_seq[row]) * max_blocks;
        const Round first = Attention::first_round(args, table, kv_head, split, splits, pos);
        QueryFragments qa;
        if constexpr (Decode) {
            const bool write_kv = split == active - 1;
            bi_bf16 *heads = reinterpret_cast<bi_bf16 *>(smem + Attention::kMergeFloats);  // [kGroup][128]
            prepare_decode_item(heads, prep, row, kv_head, pos, table, write_kv);
            __syncthreads();
            load_query(qa, heads);
        } else {
            load_query(qa, q + (static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup) * BI_HEAD_DIM);
        }
        Attention::attend_split<true>(args, row, kv_head, split, splits, pos, table, qa, first, smem);
        __syncthreads();  // shared memory is reused by a next item
    }
}

template <bool Decode>
cudaError_t launch(const Args &args, const Prep &prep, const bi_bf16 *q, const int32_t *positions, const int32_t *row_seq,
                   const int32_t *block_tables, int m, int max_blocks, int splits, cudaStream_t stream) {
    if (m <= 0 || max_blocks <= 0 || splits <= 0 || splits > BI_MAX_SPLITS) return cudaErrorInvalidValue;
    return bi::launch(split_kernel<Decode>, dim3(BI_KV_HEADS * m * splits), dim3(8 * bi::kWarp), 0, stream, args, prep, q,
                      positions, row_seq, block_tables, max_blocks, m, splits);
}

}  // namespace

extern "C" cudaError_t bi_attention(bi_bf16 *out, float *partials, int32_t *counters, const bi_bf16 *q,
                                    const bi_bf16 *k_cache, const bi_bf16 *v_cache, const int32_t *positions,
                                    const int32_t *row_seq, const int32_t *block_tables, int m, int max_blocks,
                                    int splits, cudaStream_t stream) {
    return launch<false>({out, partials, counters, k_cache, v_cache}, Prep{}, q, positions, row_seq, block_tables, m, max_blocks,
                         splits, stream);
}

extern "C" cudaError_t bi_decode_attention(bi_bf16 *out, float *partials, int32_t *counters, bi_bf16 *k_cache, bi_bf16 *v_cache,
                                           const float *qkv, const bi_bf16 *q_norm, const bi_bf16 *k_norm,
                                           const float *rope_inv_freq, const int32_t *positions, const int32_t *row_seq,
                                           const int32_t *block_tables, int m, int max_blocks, int splits, float eps,
                                           cudaStream_t stream) {
    return launch<true>({out, partials, counters, k_cache, v_cache}, Prep{qkv, q_norm, k_norm, rope_inv_freq, eps, k_cache, v_cache},
                        nullptr, positions, row_seq, block_tables, m, max_blocks, splits, stream);
}
