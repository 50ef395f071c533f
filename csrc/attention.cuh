// The attention core shared by the attention kernel and the fused layer kernel: one block
// attends one range of positions of one (row, kv head) for both of its query heads and writes
// the range's partial softmax state; the last range to finish merges them (completion counter).
#pragma once
#include "common.cuh"

namespace bi::attn {

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
// The shortest range worth a block of its own: one round of all 16 warps. Decode attention is a
// chain of dependent memory round trips; a second round per range costs two more of them, which
// is more than merging more ranges costs (measured in the fused layer kernel at context 1024:
// two rounds per range 7.3 us per layer, one round: see csrc/layer.cu).
constexpr int kMinSplitTokens = kWarps * kTokensPerRound;

// Range `split` of positions [0, pos] when a row is cut into at most `splits` ranges of at least
// kMinSplitTokens, each starting on a cache block: [begin, end), and how many ranges the row
// has (`active`; split >= active: none).
struct Range {
    int begin, end, active;
};

__device__ __forceinline__ Range split_range(int pos, int split, int splits) {
    const int kv_len = pos + 1;
    const int most = min(splits, (kv_len + kMinSplitTokens - 1) / kMinSplitTokens);
    const int chunk = ((kv_len + most - 1) / most + BI_BLOCK_TOKENS - 1) / BI_BLOCK_TOKENS * BI_BLOCK_TOKENS;
    const int begin = min(kv_len, split * chunk);
    return {begin, min(kv_len, begin + chunk), (kv_len + chunk - 1) / chunk};
}

// K and V of a warp's round: kTokensPerRound positions from `base` (a multiple of
// kTokensPerRound, so all in one cache block, `block`), clamped to end - 1 (the caller masks
// those); this lane's 4 dims, bf16.
struct Round {
    uint2 k[kTokensPerRound], v[kTokensPerRound];
};
static_assert(BI_BLOCK_TOKENS % kTokensPerRound == 0, "a round never straddles cache blocks");

__device__ __forceinline__ size_t kv_offset(int block, int kv_head, int t) {
    return ((static_cast<size_t>(block) * BI_KV_HEADS + kv_head) * BI_BLOCK_TOKENS + t % BI_BLOCK_TOKENS) * BI_HEAD_DIM +
           threadIdx.x % bi::kWarp * kDims;
}

__device__ __forceinline__ Round load_round(const bi_bf16 *k_cache, const bi_bf16 *v_cache, int block, int kv_head, int base,
                                           int end) {
    Round r;
#pragma unroll
    for (int j = 0; j < kTokensPerRound; ++j) {
        const size_t offset = kv_offset(block, kv_head, min(base + j, end - 1));
        r.k[j] = *reinterpret_cast<const uint2 *>(k_cache + offset);
        r.v[j] = *reinterpret_cast<const uint2 *>(v_cache + offset);
    }
    return r;
}

__device__ __forceinline__ void unpack_dims(float (&dst)[kDims], uint2 raw) {
    dst[0] = __uint_as_float(raw.x << 16), dst[1] = __uint_as_float(raw.x & 0xffff0000u);
    dst[2] = __uint_as_float(raw.y << 16), dst[3] = __uint_as_float(raw.y & 0xffff0000u);
}

__device__ __forceinline__ void load_dims(float (&dst)[kDims], const bi_bf16 *src) {
    unpack_dims(dst, *reinterpret_cast<const uint2 *>(src));
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

struct Args {
    bi_bf16 *out;             // [rows, 16, 128]
    float *partials;          // [rows, 16, splits, BI_PARTIAL_FLOATS]
    int32_t *counters;        // [rows, 8], zero between launches
    const bi_bf16 *k_cache;   // [blocks, 8, 16, 128] (one layer)
    const bi_bf16 *v_cache;
};

// The warp's first round of range `split` of a row (table: its block table), to be read early:
// only position `pos` may still change, and attend_split reads it again.
__device__ __forceinline__ Round first_round(const Args &args, const int32_t *table, int kv_head, int split, int splits, int pos) {
    const auto [begin, end, active] = split_range(pos, split, splits);
    const int base = begin + threadIdx.x / bi::kWarp * kTokensPerRound;
    if (split >= active || base >= end) return {};
    return load_round(args.k_cache, args.v_cache, table[base / BI_BLOCK_TOKENS], kv_head, base, end);
}

// The block's share of rows [0, pos] of `row` for `kv_head`: range `split` of at most `splits`.
// qh: this lane's dims 4l..4l+3 of the two query heads, scaled by log2(e)/sqrt(128).
// table: the row's block table; first: first_round's. smem: kSmemFloats floats. Whole block.
__device__ __forceinline__ void attend_split(const Args &args, int row, int kv_head, int split, int splits, int pos,
                                             const int32_t *table, const float (&qh)[kGroup][kDims], const Round &first,
                                             float *smem) {
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp;
    const auto [begin, end, active] = split_range(pos, split, splits);
    if (split >= active) return;  // no range: the `active` others complete the row
    float *partials = args.partials;
    bi_bf16 *out = args.out;

    // Running softmax of this warp's positions, per head: max, sum, and this lane's dims.
    float run_max[kGroup] = {-INFINITY, -INFINITY}, run_sum[kGroup] = {}, acc[kGroup][kDims] = {};
    // Rounds are double-buffered: the next round's loads are in flight while this one computes.
    constexpr int kStride = kWarps * kTokensPerRound;
    Round kv = first;
#pragma unroll
    for (int j = 0; j < kTokensPerRound; ++j)
        if (min(begin + warp * kTokensPerRound + j, end - 1) == pos) {  // written by this step: read it now, from L2
            const size_t offset = kv_offset(table[pos / BI_BLOCK_TOKENS], kv_head, pos);  // (L1 may hold the old row)
            kv.k[j] = __ldcg(reinterpret_cast<const uint2 *>(args.k_cache + offset));
            kv.v[j] = __ldcg(reinterpret_cast<const uint2 *>(args.v_cache + offset));
        }
    for (int base = begin + warp * kTokensPerRound; base < end; base += kStride) {
        const Round next = base + kStride < end
                               ? load_round(args.k_cache, args.v_cache, table[(base + kStride) / BI_BLOCK_TOKENS], kv_head, base + kStride, end)
                               : Round{};
        float k[kTokensPerRound][kDims], v[kTokensPerRound][kDims];
#pragma unroll
        for (int j = 0; j < kTokensPerRound; ++j) unpack_dims(k[j], kv.k[j]), unpack_dims(v[j], kv.v[j]);
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
        kv = next;
    }

    // Merge the warps (one thread per head and dim), then write this range's partial.
    auto warp_state = reinterpret_cast<float (*)[kGroup][BI_PARTIAL_FLOATS]>(smem);  // [kWarps]
#pragma unroll
    for (int h = 0; h < kGroup; ++h) {
        if (lane == 0) warp_state[warp][h][0] = run_max[h], warp_state[warp][h][1] = run_sum[h];
#pragma unroll
        for (int d = 0; d < kDims; ++d) warp_state[warp][h][2 + lane * kDims + d] = acc[h][d];
    }
    bi::sync_compute_warps();
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
        if (active == 1) {  // the whole row in one range: no partials to merge
            out[(static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup + h) * BI_HEAD_DIM + d] = bi::f32_to_bf16(merged / sum);
        } else {
            float *dst = partials + ((static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup + h) * splits + split) * BI_PARTIAL_FLOATS;
            if (d == 0) dst[0] = best, dst[1] = sum;
            dst[2 + d] = merged;
        }
    }
    if (active == 1) return;

    // The last block of this (row, kv head) to finish merges every range into the output. The
    // counter's add releases this block's partial (ordered before it by the block barrier) and
    // acquires the others'.
    __shared__ bool last;
    bi::sync_compute_warps();
    if (threadIdx.x == 0) {
        int32_t *counter = args.counters + static_cast<size_t>(row) * BI_KV_HEADS + kv_head;
        int before;
        asm volatile("atom.acq_rel.gpu.add.s32 %0, [%1], 1;\n" : "=r"(before) : "l"(counter) : "memory");
        last = before == active - 1;
        if (last) *counter = 0;  // ready for the next launch
    }
    bi::sync_compute_warps();
    if (!last) return;
    // Stage the ranges of both heads with parallel loads (L2: other blocks wrote them), then merge.
    auto staged = reinterpret_cast<float (*)[BI_MAX_SPLITS][BI_PARTIAL_FLOATS]>(smem);  // [kGroup]
    const float *ranges = partials + (static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup) * splits * BI_PARTIAL_FLOATS;
    for (int i = threadIdx.x; i < kGroup * active * BI_PARTIAL_FLOATS; i += kWarps * bi::kWarp) {
        const int head = i / (active * BI_PARTIAL_FLOATS), rest = i % (active * BI_PARTIAL_FLOATS);
        staged[head][rest / BI_PARTIAL_FLOATS][rest % BI_PARTIAL_FLOATS] = __ldcg(ranges + head * splits * BI_PARTIAL_FLOATS + rest);
    }
    bi::sync_compute_warps();
    if (h < kGroup) combine(out + (static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup + h) * BI_HEAD_DIM, staged[h], active, d);
}

}  // namespace bi::attn
