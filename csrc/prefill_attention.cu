// Causal GQA attention of prompt rows (prefill), flash-attention style: a block takes one tile
// of up to 64 rows of one sequence (a prefill pass may pack several prompts back to back; the
// host lists each prompt's tiles) and one kv head, and streams that head's K/V through shared
// memory in tiles of 64 positions (double-buffered cp.async), which its 8 warps share: warp w
// multiplies rows 16 (w % 4).. of query head 2 kv_head + w / 4 against each tile on the tensor
// core (scores Q.K^T, then P.V with P straight from the score registers), with a running
// softmax per row.
// The decode kernel (attention.cu), which prefill used before, reads every row's K/V range on
// its own: a prompt of n tokens read ~n^2 / 2 K/V rows per layer, and a 2,000-token prefill took
// 44.3 ms (45,181 tok/s); with this kernel 9.8 ms (204,143 tok/s; H200, benches/decode.rs).
#include "attention.cuh"  // kv_row, kGroup; matvec.cuh: mma, cp.async, ldmatrix

namespace {

using bi::attn::kGroup;
using bi::attn::kv_row;

constexpr int kRows = BI_PREFILL_TILE_ROWS;  // query rows per block
constexpr int kKeys = 64;           // positions per K/V tile
constexpr int kWarps = 8;           // (row group of 16, query head of the kv head's two)
constexpr int kThreads = kWarps * bi::kWarp;
constexpr int kPitch = BI_HEAD_DIM + 8;  // bf16 per staged row: 272 bytes, so ldmatrix's 8 rows hit distinct banks
constexpr int kTileElems = kKeys * kPitch;
constexpr int kSmemBytes = 2 * 2 * kTileElems * 2;  // K and V, two buffers each
constexpr int kDimTiles = BI_HEAD_DIM / 8;          // n8 tiles of the output
constexpr int kKeyTiles = kKeys / 8;                // n8 tiles of the scores
static_assert(kRows == 4 * 16 && kWarps == 4 * kGroup, "four row groups per query head");
static_assert(kKeys % BI_BLOCK_TOKENS == 0, "a tile holds whole cache blocks");

// Positions [first, first + kKeys) of kv head h into `k` and `v` (positions past `last` repeat
// it: the scores mask them). 16-byte chunks, 4 + 4 per thread.
__device__ __forceinline__ void load_tile(bi_bf16 *k, bi_bf16 *v, const bi_bf16 *k_cache, const bi_bf16 *v_cache,
                                          const int32_t *table, int kv_head, int first, int last) {
    constexpr int kChunks = BI_HEAD_DIM / 8;  // per row
    for (int i = threadIdx.x; i < kKeys * kChunks; i += kThreads) {
        const int key = i / kChunks, chunk = i % kChunks, pos = min(first + key, last);
        const size_t at = kv_row(table[pos / BI_BLOCK_TOKENS], kv_head, pos) + chunk * 8;
        bi::cp_async16(k + key * kPitch + chunk * 8, k_cache + at);
        bi::cp_async16(v + key * kPitch + chunk * 8, v_cache + at);
    }
    asm volatile("cp.async.commit_group;\n");
}

// grid (row tiles, kv heads), the last tiles first (within a prompt, the heaviest: its latest positions).
__global__ void __launch_bounds__(kThreads) prefill_kernel(bi_bf16 *__restrict__ out, const bi_bf16 *__restrict__ q,
                                                           const bi_bf16 *__restrict__ k_cache,
                                                           const bi_bf16 *__restrict__ v_cache,
                                                           const int32_t *__restrict__ positions,
                                                           const int32_t *__restrict__ row_seq,
                                                           const int32_t *__restrict__ block_tables,
                                                           const int32_t *__restrict__ row_tiles, int max_blocks) {
    extern __shared__ __align__(16) bi_bf16 tiles[];  // [buffer][K, V][kKeys][kPitch]
    __shared__ int block_last;
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp, g = lane / 4, q4 = lane % 4;
    const int tile = gridDim.x - 1 - blockIdx.x, kv_head = blockIdx.y;
    const int row0 = row_tiles[2 * tile], m = row0 + row_tiles[2 * tile + 1];  // rows [row0, m)
    const int head = kv_head * kGroup + warp / 4, rows = row0 + 16 * (warp % 4);  // this warp's 16 rows
    bi::allow_next_kernel();
    bi::wait_for_previous_kernel();
    if (threadIdx.x == 0) block_last = -1;
    __syncthreads();
    // The last position any row of the block attends to.
    if (threadIdx.x < kRows && row0 + threadIdx.x < m) atomicMax(&block_last, positions[row0 + threadIdx.x]);
    __syncthreads();
    const int last = block_last;
    const int32_t *table = block_tables + static_cast<size_t>(row_seq[row0]) * max_blocks;
    const int pos_lo = rows + g < m ? positions[rows + g] : -1, pos_hi = rows + g + 8 < m ? positions[rows + g + 8] : -1;
    if (last < 0) {  // only padding rows
        for (int i = threadIdx.x; i < kRows * kGroup * BI_HEAD_DIM; i += kThreads) {
            const int r = row0 + i / (kGroup * BI_HEAD_DIM);
            if (r < m) out[(static_cast<size_t>(r) * BI_Q_HEADS + kv_head * kGroup) * BI_HEAD_DIM + i % (kGroup * BI_HEAD_DIM)] = 0;
        }
        return;
    }
    const int tiles_needed = last / kKeys + 1;
    load_tile(tiles, tiles + kTileElems, k_cache, v_cache, table, kv_head, 0, last);

    // Q as A fragments: k-step s (dims 16 s..) of rows g and g + 8 (zeros past the tile).
    uint32_t qa[BI_HEAD_DIM / 16][4];
    auto q_pair = [&](int row, int dim) {
        return row < m ? *reinterpret_cast<const uint32_t *>(q + (static_cast<size_t>(row) * BI_Q_HEADS + head) * BI_HEAD_DIM + dim) : 0u;
    };
#pragma unroll
    for (int s = 0; s < BI_HEAD_DIM / 16; ++s) {
        qa[s][0] = q_pair(rows + g, 16 * s + 2 * q4), qa[s][1] = q_pair(rows + g + 8, 16 * s + 2 * q4);
        qa[s][2] = q_pair(rows + g, 16 * s + 8 + 2 * q4), qa[s][3] = q_pair(rows + g + 8, 16 * s + 8 + 2 * q4);
    }
    const float scale = rsqrtf(static_cast<float>(BI_HEAD_DIM)) * 1.4426950408889634f;  // base-2 scores
    float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.0f, 0.0f};  // rows g, g + 8 (this lane's share of the sum)
    float acc[kDimTiles][4] = {};
    for (int t = 0; t < tiles_needed; ++t) {
        if (t + 1 < tiles_needed) {
            bi_bf16 *next = tiles + ((t + 1) % 2) * 2 * kTileElems;
            load_tile(next, next + kTileElems, k_cache, v_cache, table, kv_head, (t + 1) * kKeys, last);
            asm volatile("cp.async.wait_group 1;\n");
        } else {
            asm volatile("cp.async.wait_group 0;\n");
        }
        __syncthreads();
        const bi_bf16 *k = tiles + (t % 2) * 2 * kTileElems, *v = k + kTileElems;
        // Scores of 64 positions: n8 tile j holds positions 8 j + 2 q4, + 1 of rows g, g + 8.
        float s[kKeyTiles][4] = {};
#pragma unroll
        for (int step = 0; step < BI_HEAD_DIM / 16; ++step) {
#pragma unroll
            for (int j = 0; j < kKeyTiles; j += 2) {  // matrices: (keys 8j.., dims 16 step), (.., + 8), (keys 8j + 8.., ..)
                uint32_t b[4];
                const int mat = lane / 8;
                bi::ldmatrix_x4(b, k + (8 * j + 8 * (mat / 2) + lane % 8) * kPitch + 16 * step + 8 * (mat % 2));
                bi::mma_bf16(s[j], qa[step][0], qa[step][1], qa[step][2], qa[step][3], b[0], b[1]);
                bi::mma_bf16(s[j + 1], qa[step][0], qa[step][1], qa[step][2], qa[step][3], b[2], b[3]);
            }
        }
        // Mask (position past the row's), running max and sum per row.
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < kKeyTiles; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = t * kKeys + 8 * j + 2 * q4 + e % 2;
                const int pos = e < 2 ? pos_lo : pos_hi;
                s[j][e] = key <= pos ? s[j][e] * scale : -INFINITY;
                tile_max[e / 2] = fmaxf(tile_max[e / 2], s[j][e]);
            }
        float correction[2], reference[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
            const float new_max = fmaxf(run_max[h], tile_max[h]);
            reference[h] = new_max == -INFINITY ? 0.0f : new_max;  // a row with nothing yet (padding)
            correction[h] = exp2f(run_max[h] - reference[h]);
            run_max[h] = new_max;
            run_sum[h] *= correction[h];
        }
#pragma unroll
        for (int d = 0; d < kDimTiles; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[d][e] *= correction[e / 2];
        // P as A fragments (k-step i: positions 16 i..), rounded to bf16 as the product's input.
        uint32_t pa[kKeys / 16][4];
#pragma unroll
        for (int j = 0; j < kKeyTiles; ++j) {
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                p[e] = exp2f(s[j][e] - reference[e / 2]);
                run_sum[e / 2] += p[e];
            }
            pa[j / 2][(j % 2) * 2] = bi::pack_bf16x2(p[0], p[1]);
            pa[j / 2][(j % 2) * 2 + 1] = bi::pack_bf16x2(p[2], p[3]);
        }
        // acc += P.V: V tile rows are positions (k), columns dims (n): transposed fragments.
#pragma unroll
        for (int i = 0; i < kKeys / 16; ++i) {
#pragma unroll
            for (int d = 0; d < kDimTiles; d += 2) {  // matrices: (keys 16 i.., dims 8 d), (keys 16 i + 8.., ..), (.., dims 8 d + 8), ..
                uint32_t b[4];
                const int mat = lane / 8;
                bi::ldmatrix_x4<true>(b, v + (16 * i + 8 * (mat % 2) + lane % 8) * kPitch + 8 * d + 8 * (mat / 2));
                bi::mma_bf16(acc[d], pa[i][0], pa[i][1], pa[i][2], pa[i][3], b[0], b[1]);
                bi::mma_bf16(acc[d + 1], pa[i][0], pa[i][1], pa[i][2], pa[i][3], b[2], b[3]);
            }
        }
        __syncthreads();  // this buffer is refilled next iteration
    }
    // Each row's sum over the 4 lanes that hold its columns, then out = acc / sum in bf16.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        run_sum[h] += __shfl_xor_sync(0xffffffffu, run_sum[h], 1);
        run_sum[h] += __shfl_xor_sync(0xffffffffu, run_sum[h], 2);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = rows + g + 8 * h;
        if (row >= m) continue;
        bi_bf16 *dst = out + (static_cast<size_t>(row) * BI_Q_HEADS + head) * BI_HEAD_DIM;
        const int pos = h == 0 ? pos_lo : pos_hi;
        const float inv = pos < 0 ? 0.0f : 1.0f / run_sum[h];  // padding rows: zeros
#pragma unroll
        for (int d = 0; d < kDimTiles; ++d)
            *reinterpret_cast<uint32_t *>(dst + 8 * d + 2 * q4) = bi::pack_bf16x2(acc[d][2 * h] * inv, acc[d][2 * h + 1] * inv);
    }
}

}  // namespace

extern "C" cudaError_t bi_prefill_attention(bi_bf16 *out, const bi_bf16 *q, const bi_bf16 *k_cache, const bi_bf16 *v_cache,
                                            const int32_t *positions, const int32_t *row_seq, const int32_t *block_tables,
                                            const int32_t *row_tiles, int tiles, int max_blocks, cudaStream_t stream) {
    if (tiles <= 0 || max_blocks <= 0) return cudaErrorInvalidValue;
    const cudaError_t e = cudaFuncSetAttribute(prefill_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (e != cudaSuccess) return e;
    return bi::launch(prefill_kernel, dim3(tiles, BI_KV_HEADS), dim3(kThreads), kSmemBytes, stream, out, q, k_cache, v_cache,
                      positions, row_seq, block_tables, row_tiles, max_blocks);
}
