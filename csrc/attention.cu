// Causal GQA attention over the paged KV cache, split along the sequence (flash-decoding):
// blocks of `split_kernel` each cover one range of positions for one kv head (both of its query
// heads, so every K/V row is read once); the last block of a (row, kv head) to finish merges
// the ranges (a completion counter instead of a second launch).
// The same kernels serve decode (one row per sequence) and prefill (one row per prompt token).
#include "common.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kGroup = BI_Q_HEADS / BI_KV_HEADS;  // query heads per kv head
constexpr int kParts = 4;                         // lanes per token; each holds 32 dims
constexpr int kDimsPerLane = BI_HEAD_DIM / kParts;
constexpr int kTokensPerWarp = bi::kWarp / kParts;  // tokens a warp scores at once
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kGroup == 2, "the kernel keeps two query heads per kv head in registers");
static_assert(kDimsPerLane % 8 == 0, "each lane reads its dims as 16-byte vectors");
// A range shorter than this is not worth a block of its own: short contexts use fewer splits.
constexpr int kMinSplitTokens = 64;

__device__ __forceinline__ void load_dims(float (&dst)[kDimsPerLane], const bi_bf16 *src) {
#pragma unroll
    for (int v = 0; v < kDimsPerLane / 8; ++v) {
        const uint4 raw = *reinterpret_cast<const uint4 *>(src + v * 8);
        const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            dst[v * 8 + 2 * j] = __uint_as_float(words[j] << 16);
            dst[v * 8 + 2 * j + 1] = __uint_as_float(words[j] & 0xffff0000u);
        }
    }
}

// Running softmax state of one stream of positions for one query head, base-2 exponents.
struct Running {
    float max = -INFINITY, sum = 0.0f;
    float acc[kDimsPerLane] = {};
};

// Folds `other` (max, sum, acc) into `r`; an empty side (max = -inf) contributes nothing.
__device__ __forceinline__ void merge(Running &r, float other_max, float other_sum, const float (&other_acc)[kDimsPerLane]) {
    const float new_max = fmaxf(r.max, other_max);
    if (new_max == -INFINITY) return;
    const float self_scale = exp2f(r.max - new_max), other_scale = exp2f(other_max - new_max);
    r.sum = r.sum * self_scale + other_sum * other_scale;
#pragma unroll
    for (int d = 0; d < kDimsPerLane; ++d) r.acc[d] = r.acc[d] * self_scale + other_acc[d] * other_scale;
    r.max = new_max;
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

// grid (kv heads, rows, splits); 4 warps; lane = token (lane / 4) x part (lane % 4).
__global__ void __launch_bounds__(kWarps * bi::kWarp)
    split_kernel(bi_bf16 *__restrict__ out, float *__restrict__ partials, int32_t *__restrict__ counters,
                 const bi_bf16 *__restrict__ q, const bi_bf16 *__restrict__ k_cache, const bi_bf16 *__restrict__ v_cache,
                 const int32_t *__restrict__ positions, const int32_t *__restrict__ row_seq,
                 const int32_t *__restrict__ block_tables, int max_blocks, const void *prefetch,
                 size_t prefetch_bytes) {
    const int kv_head = blockIdx.x, row = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp;
    const int part = lane % kParts, token_lane = lane / kParts;
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

    float qh[kGroup][kDimsPerLane];
    const float scale = rsqrtf(static_cast<float>(BI_HEAD_DIM)) * kLog2e;
#pragma unroll
    for (int h = 0; h < kGroup; ++h) {
        load_dims(qh[h], q + (static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup + h) * BI_HEAD_DIM + part * kDimsPerLane);
#pragma unroll
        for (int d = 0; d < kDimsPerLane; ++d) qh[h][d] *= scale;
    }

    Running run[kGroup];
    // Every lane runs the same number of rounds (full-warp shuffles); lanes past `end` idle.
    for (int base = begin + warp * kTokensPerWarp; base < end; base += kWarps * kTokensPerWarp) {
        const int t = base + token_lane;
        const bool valid = t < end;
        float k[kDimsPerLane] = {}, v[kDimsPerLane] = {};
        if (valid) {
            const size_t offset = ((static_cast<size_t>(table[t / BI_BLOCK_TOKENS]) * BI_KV_HEADS + kv_head) * BI_BLOCK_TOKENS +
                                   t % BI_BLOCK_TOKENS) * BI_HEAD_DIM + part * kDimsPerLane;
            load_dims(k, k_cache + offset);
            load_dims(v, v_cache + offset);
        }
#pragma unroll
        for (int h = 0; h < kGroup; ++h) {
            float s = 0.0f;
#pragma unroll
            for (int d = 0; d < kDimsPerLane; ++d) s += qh[h][d] * k[d];
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            if (!valid) continue;
            const float new_max = fmaxf(run[h].max, s);
            const float correction = exp2f(run[h].max - new_max), p = exp2f(s - new_max);
            run[h].sum = run[h].sum * correction + p;
#pragma unroll
            for (int d = 0; d < kDimsPerLane; ++d) run[h].acc[d] = run[h].acc[d] * correction + p * v[d];
            run[h].max = new_max;
        }
    }

    // Merge the 8 token lanes of each warp (lanes with the same part), then the 4 warps.
#pragma unroll
    for (int h = 0; h < kGroup; ++h) {
#pragma unroll
        for (int offset = kParts; offset < bi::kWarp; offset *= 2) {
            float other_acc[kDimsPerLane];
#pragma unroll
            for (int d = 0; d < kDimsPerLane; ++d) other_acc[d] = __shfl_xor_sync(0xffffffffu, run[h].acc[d], offset);
            const float other_max = __shfl_xor_sync(0xffffffffu, run[h].max, offset);
            const float other_sum = __shfl_xor_sync(0xffffffffu, run[h].sum, offset);
            merge(run[h], other_max, other_sum, other_acc);
        }
    }
    __shared__ float warp_state[kWarps][kGroup][BI_PARTIAL_FLOATS];
    if (token_lane == 0) {
#pragma unroll
        for (int h = 0; h < kGroup; ++h) {
            if (part == 0) warp_state[warp][h][0] = run[h].max, warp_state[warp][h][1] = run[h].sum;
#pragma unroll
            for (int d = 0; d < kDimsPerLane; ++d) warp_state[warp][h][2 + part * kDimsPerLane + d] = run[h].acc[d];
        }
    }
    __syncthreads();
    const int d = threadIdx.x;  // one output dim per thread, both heads
    static_assert(kWarps * bi::kWarp == BI_HEAD_DIM, "one thread per head dim in the final merge");
#pragma unroll
    for (int h = 0; h < kGroup; ++h) {
        float best = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) best = fmaxf(best, warp_state[w][h][0]);
        float sum = 0.0f, acc = 0.0f;
        if (best != -INFINITY) {
#pragma unroll
            for (int w = 0; w < kWarps; ++w) {
                const float scale_w = exp2f(warp_state[w][h][0] - best);
                sum += warp_state[w][h][1] * scale_w;
                acc += warp_state[w][h][2 + d] * scale_w;
            }
        }
        float *dst = partials + ((static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup + h) * splits + split) * BI_PARTIAL_FLOATS;
        if (split < active) {
            if (d == 0) dst[0] = best, dst[1] = sum;
            dst[2 + d] = acc;
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
    __shared__ float staged[kGroup][BI_MAX_SPLITS][BI_PARTIAL_FLOATS];
    const float *first = partials + (static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup) * splits * BI_PARTIAL_FLOATS;
    for (int h = 0; h < kGroup; ++h)
        for (int i = threadIdx.x; i < active * BI_PARTIAL_FLOATS; i += blockDim.x)
            staged[h][i / BI_PARTIAL_FLOATS][i % BI_PARTIAL_FLOATS] = __ldcg(first + h * splits * BI_PARTIAL_FLOATS + i);
    __syncthreads();
#pragma unroll
    for (int h = 0; h < kGroup; ++h)
        combine(out + (static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup + h) * BI_HEAD_DIM, staged[h], active, d);
}

}  // namespace

extern "C" cudaError_t bi_attention(bi_bf16 *out, float *partials, int32_t *counters, const bi_bf16 *q, const bi_bf16 *k_cache,
                                    const bi_bf16 *v_cache, const int32_t *positions, const int32_t *row_seq,
                                    const int32_t *block_tables, int m, int max_blocks, int splits,
                                    const void *prefetch, size_t prefetch_bytes, cudaStream_t stream) {
    if (m <= 0 || max_blocks <= 0 || splits <= 0 || splits > BI_MAX_SPLITS) return cudaErrorInvalidValue;
    return bi::launch(split_kernel, dim3(BI_KV_HEADS, m, splits), dim3(kWarps * bi::kWarp), 0, stream, out, partials,
                      counters, q, k_cache, v_cache, positions, row_seq, block_tables, max_blocks, prefetch,
                      prefetch_bytes);
}
