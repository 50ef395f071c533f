// Causal GQA attention over the paged KV cache, split along the sequence (flash-decoding):
// blocks of `split_kernel` each cover one range of positions for one kv head (both of its query
// heads, so every K/V row is read once); the last block of a (row, kv head) to finish merges
// the ranges (a completion counter instead of a second launch).
// The same kernel serves decode (one row per sequence) and prefill (one row per prompt token).
//
// Layout: lane l owns dims 4l..4l+3 of both query heads, so a warp reads whole 256-byte K/V
// rows and needs no merge across lanes; a warp scores kTokensPerRound positions at once, whose
// independent shuffle reductions interleave. (An earlier layout, 4 lanes per token with 32 dims
// each, needed 210 registers and a merge across lanes, and took 17 us per layer at context 1024
// on an H200: benches/kernels.rs.)
#include "common.cuh"

namespace {

constexpr int kWarps = 16;
constexpr int kGroup = BI_Q_HEADS / BI_KV_HEADS;  // query heads per kv head
constexpr int kDims = BI_HEAD_DIM / bi::kWarp;    // dims per lane
constexpr int kTokensPerRound = 4;
// Shared memory: the warps' states for the block merge, later the ranges for the final merge.
constexpr int kSmemFloats = kGroup * BI_PARTIAL_FLOATS * (kWarps > BI_MAX_SPLITS ? kWarps : BI_MAX_SPLITS);
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kGroup == 2, "the kernel keeps two query heads per kv head in registers");
static_assert(kDims == 4, "each lane reads its dims as one 8-byte vector");
static_assert(kWarps * bi::kWarp >= kGroup * BI_HEAD_DIM, "one thread per (head, dim) in the final merge");
// A range shorter than this is not worth a block of its own: short contexts use fewer splits.
// One round of all 16 warps covers it, so a block waits on memory about twice (table, K/V).
constexpr int kMinSplitTokens = kWarps * kTokensPerRound;

__device__ __forceinline__ void load_dims(float (&dst)[kDims], const bi_bf16 *src) {
    const uint2 raw = *reinterpret_cast<const uint2 *>(src);
    dst[0] = __uint_as_float(raw.x << 16), dst[1] = __uint_as_float(raw.x & 0xffff0000u);
    dst[2] = __uint_as_float(raw.y << 16), dst[3] = __uint_as_float(raw.y & 0xffff0000u);
}

// Merges `active` ranges of one head (staged in shared memory) into out[d] (bf16).
__device__ __forceinline__ void combine(bi_bf16 *out, const float (*p)[BI_PARTIAL_FLOATS], int active, int d) {
    float best = -INFINITY;
    for (int s = 0; s < active; ++s) best = fmaxf(best, p[s][0]);
    float sum = 0.0f, acc = 0.0f;
    for (int s = 0; s < active; ++s) {
        const float scale = p[s][0] == -INFINITY ? 0.0f : exp2f(p[s][0] - best);  // an empty range adds nothing
        sum += p[s][1] * scale;
        acc += p[s][2 + d] * scale;
    }
    out[d] = bi::f32_to_bf16(acc / sum);
}

// grid (kv heads, rows, splits); 4 warps.
__global__ void __launch_bounds__(kWarps * bi::kWarp)
    split_kernel(bi_bf16 *__restrict__ out, float *__restrict__ partials, int32_t *__restrict__ counters,
                 const bi_bf16 *__restrict__ q, const bi_bf16 *__restrict__ k_cache, const bi_bf16 *__restrict__ v_cache,
                 const int32_t *__restrict__ positions, const int32_t *__restrict__ row_seq,
                 const int32_t *__restrict__ block_tables, int max_blocks, const void *prefetch,
                 size_t prefetch_bytes) {
    const int kv_head = blockIdx.x, row = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp;
    bi::allow_next_kernel();
    bi::prefetch_l2_share(prefetch, prefetch_bytes);
    bi::wait_for_previous_kernel();
    const int pos = positions[row];
    if (pos < 0) {  // padding row: zeros
        if (split == 0)
            for (int i = threadIdx.x; i < kGroup * BI_HEAD_DIM; i += blockDim.x)
                out[(static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup) * BI_HEAD_DIM + i] = 0;
        return;
    }
    const int kv_len = pos + 1;
    const int active = min(splits, (kv_len + kMinSplitTokens - 1) / kMinSplitTokens);
    const int chunk = (kv_len + active - 1) / active;
    // Blocks past `active` have no range; they only count themselves in below.
    const int begin = split < active ? split * chunk : kv_len, end = min(kv_len, begin + chunk);
    const int32_t *table = block_tables + static_cast<size_t>(row_seq[row]) * max_blocks;

    float qh[kGroup][kDims];
    const float scale = rsqrtf(static_cast<float>(BI_HEAD_DIM)) * kLog2e;  // scores in base 2
#pragma unroll
    for (int h = 0; h < kGroup; ++h) {
        load_dims(qh[h], q + (static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup + h) * BI_HEAD_DIM + lane * kDims);
#pragma unroll
        for (int d = 0; d < kDims; ++d) qh[h][d] *= scale;
    }

    // Running softmax of this warp's positions, per head: max, sum, and this lane's dims.
    float run_max[kGroup] = {-INFINITY, -INFINITY}, run_sum[kGroup] = {}, acc[kGroup][kDims] = {};
    for (int base = begin + warp * kTokensPerRound; base < end; base += kWarps * kTokensPerRound) {
        float k[kTokensPerRound][kDims], v[kTokensPerRound][kDims];
#pragma unroll
        for (int j = 0; j < kTokensPerRound; ++j) {
            const int t = min(base + j, end - 1);  // past the end: a valid row, masked below
            const size_t offset = ((static_cast<size_t>(table[t / BI_BLOCK_TOKENS]) * BI_KV_HEADS + kv_head) * BI_BLOCK_TOKENS +
                                   t % BI_BLOCK_TOKENS) * BI_HEAD_DIM + lane * kDims;
            load_dims(k[j], k_cache + offset);
            load_dims(v[j], v_cache + offset);
        }
#pragma unroll
        for (int h = 0; h < kGroup; ++h) {
            float s[kTokensPerRound];
#pragma unroll
            for (int j = 0; j < kTokensPerRound; ++j) {
                s[j] = 0.0f;
#pragma unroll
                for (int d = 0; d < kDims; ++d) s[j] += qh[h][d] * k[j][d];
            }
#pragma unroll
            for (int offset = bi::kWarp / 2; offset > 0; offset /= 2)
#pragma unroll
                for (int j = 0; j < kTokensPerRound; ++j) s[j] += __shfl_xor_sync(0xffffffffu, s[j], offset);
            float new_max = run_max[h];
#pragma unroll
            for (int j = 0; j < kTokensPerRound; ++j)
                if (base + j < end) new_max = fmaxf(new_max, s[j]);
            const float correction = exp2f(run_max[h] - new_max);
            run_sum[h] *= correction;
#pragma unroll
            for (int d = 0; d < kDims; ++d) acc[h][d] *= correction;
#pragma unroll
            for (int j = 0; j < kTokensPerRound; ++j) {
                const float p = base + j < end ? exp2f(s[j] - new_max) : 0.0f;
                run_sum[h] += p;
#pragma unroll
                for (int d = 0; d < kDims; ++d) acc[h][d] += p * v[j][d];
            }
            run_max[h] = new_max;
        }
    }

    // Merge the warps (one thread per head and dim), then write this range's partial.
    __shared__ float smem[kSmemFloats];
    auto warp_state = reinterpret_cast<float (*)[kGroup][BI_PARTIAL_FLOATS]>(smem);  // [kWarps]
#pragma unroll
    for (int h = 0; h < kGroup; ++h) {
        if (lane == 0) warp_state[warp][h][0] = run_max[h], warp_state[warp][h][1] = run_sum[h];
#pragma unroll
        for (int d = 0; d < kDims; ++d) warp_state[warp][h][2 + lane * kDims + d] = acc[h][d];
    }
    __syncthreads();
    const int h = threadIdx.x / BI_HEAD_DIM, d = threadIdx.x % BI_HEAD_DIM;
    if (h < kGroup) {
        float best = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) best = fmaxf(best, warp_state[w][h][0]);
        float sum = 0.0f, merged = 0.0f;
        if (best != -INFINITY) {
#pragma unroll
            for (int w = 0; w < kWarps; ++w) {
                const float scale_w = exp2f(warp_state[w][h][0] - best);
                sum += warp_state[w][h][1] * scale_w;
                merged += warp_state[w][h][2 + d] * scale_w;
            }
        }
        float *dst = partials + ((static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup + h) * splits + split) * BI_PARTIAL_FLOATS;
        if (split < active) {
            if (d == 0) dst[0] = best, dst[1] = sum;
            dst[2 + d] = merged;
        }
    }

    // The last block of this (row, kv head) to finish merges every range into the output.
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int32_t *counter = counters + static_cast<size_t>(row) * BI_KV_HEADS + kv_head;
        last = atomicAdd(counter, 1) == splits - 1;
        if (last) *counter = 0;  // ready for the next launch
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // Stage the ranges of both heads with parallel loads (L2: other blocks wrote them), then merge.
    auto staged = reinterpret_cast<float (*)[BI_MAX_SPLITS][BI_PARTIAL_FLOATS]>(smem);  // [kGroup]
    const float *first = partials + (static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup) * splits * BI_PARTIAL_FLOATS;
    for (int i = threadIdx.x; i < kGroup * active * BI_PARTIAL_FLOATS; i += blockDim.x) {
        const int head = i / (active * BI_PARTIAL_FLOATS), rest = i % (active * BI_PARTIAL_FLOATS);
        staged[head][rest / BI_PARTIAL_FLOATS][rest % BI_PARTIAL_FLOATS] = __ldcg(first + head * splits * BI_PARTIAL_FLOATS + rest);
    }
    __syncthreads();
    if (h < kGroup) combine(out + (static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup + h) * BI_HEAD_DIM, staged[h], active, d);
}

}  // namespace

extern "C" cudaError_t bi_attention(bi_bf16 *out, float *partials, int32_t *counters, const bi_bf16 *q,
                                    const bi_bf16 *k_cache, const bi_bf16 *v_cache, const int32_t *positions,
                                    const int32_t *row_seq, const int32_t *block_tables, int m, int max_blocks,
                                    int splits, const void *prefetch, size_t prefetch_bytes, cudaStream_t stream) {
    if (m <= 0 || max_blocks <= 0 || splits <= 0 || splits > BI_MAX_SPLITS) return cudaErrorInvalidValue;
    return bi::launch(split_kernel, dim3(BI_KV_HEADS, m, splits), dim3(kWarps * bi::kWarp), 0, stream, out, partials,
                      counters, q, k_cache, v_cache, positions, row_seq, block_tables, max_blocks, prefetch,
                      prefetch_bytes);
}
