// The attention core shared by the attention kernel and the fused layer kernel: one block
// attends one range of positions of one (row, kv head) for both of its query heads and writes
// the range's partial softmax state; the last range to finish merges them (completion counter).
#pragma once
#include "bulk_copy.cuh"  // evict_first_policy
#include "matvec.cuh"     // mma_bf16

namespace bi::attn {

constexpr int kGroup = BI_Q_HEADS / BI_KV_HEADS;  // query heads per kv head
constexpr int kDims = BI_HEAD_DIM / bi::kWarp;    // dims per lane in P.V and the merges
// A warp's round: one n8 tile of positions, scored on the tensor core (m16n8k16: rows = the
// two query heads, zero-padded to 16; k = head dims). Per 8 positions a warp issues 8 mma, 20
// shuffles and 64 FMA (P.V, lane l owning dims 4l..4l+3); the CUDA-core version before it
// (dot products reduced across the warp) issued ~500 instructions and 80 shuffles, which
// bounded large decode batches (batch 256, context 512: ~220 us per layer on an H200).
constexpr int kTokensPerRound = 8;
constexpr int kChunks = BI_HEAD_DIM / 32;  // 16-byte K chunks per lane (two k16 steps each)
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kGroup == 2, "two query heads per kv head: rows 0 and 1 of the score mma");
static_assert(kDims == 4, "each lane reads its V dims as one 8-byte vector");

// A row's range of positions [begin, end), and how many ranges the row has (`active`).
struct Range {
    int begin, end, active;
};

// The query heads as the score mma's A fragments: lane (g, q) = (lane / 4, lane % 4) holds, for
// g < 2, head g's dims 32c + 8q .. 32c + 8q + 7 in qa[c] (bf16; zero for g >= 2). Within each
// 32-dim chunk the k axis is permuted the same way for Q and K (the dot product is unchanged),
// so one 16-byte load per chunk feeds two k16 steps.
using QueryFragments = uint4[kChunks];

// K and V of a warp's round: kTokensPerRound positions from `base` (a multiple of 8, so in one
// cache block, `block`), clamped to end - 1 (the caller masks those). k: this lane's 16-byte
// chunks of position base + g; v: every position's dims 4l..4l+3. Read through L2 only (each
// row is read once, and the row at `pos` was just written by another block), evict-first there.
struct Round {
    uint4 k[kChunks];
    uint2 v[kTokensPerRound];
};
static_assert(BI_BLOCK_TOKENS % kTokensPerRound == 0, "a round never straddles cache blocks");

__device__ __forceinline__ size_t kv_row(int block, int kv_head, int t) {
    return ((static_cast<size_t>(block) * BI_KV_HEADS + kv_head) * BI_BLOCK_TOKENS + t % BI_BLOCK_TOKENS) * BI_HEAD_DIM;
}

// A K or V load: through L2 only (cg), hinted evict-first there (`policy`), so that the stream of
// K/V, read once per step, does not push out of L2 what is read again (the activations, and at
// batches of many chains the weights each chain reads): batch 32 / 64 / 128 / 256 at context 512
// 18,494 / 26,421 / 37,477 / 45,093 -> 19,251 / 27,141 / 38,960 / 46,182 tok/s, batch 16
// +0.7% (H200, same run; weights hinted evict-last besides: no better).
__device__ __forceinline__ uint4 load_kv16(const void *p, uint64_t policy) {
    uint4 v;
    asm volatile("ld.global.cg.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p), "l"(policy));
    return v;
}
__device__ __forceinline__ uint2 load_kv8(const void *p, uint64_t policy) {
    uint2 v;
    asm volatile("ld.global.cg.L2::cache_hint.v2.u32 {%0,%1}, [%2], %3;\n" : "=r"(v.x), "=r"(v.y) : "l"(p), "l"(policy));
    return v;
}

__device__ __forceinline__ Round load_round(const bi_bf16 *k_cache, const bi_bf16 *v_cache, int block, int kv_head, int base,
                                           int end) {
    const int lane = threadIdx.x % bi::kWarp, g = lane / 4, q = lane % 4;
    const uint64_t policy = bi::evict_first_policy();
    Round r;
    const bi_bf16 *k_row = k_cache + kv_row(block, kv_head, min(base + g, end - 1)) + 8 * q;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) r.k[c] = load_kv16(k_row + 32 * c, policy);
#pragma unroll
    for (int j = 0; j < kTokensPerRound; ++j)
        r.v[j] = load_kv8(v_cache + kv_row(block, kv_head, min(base + j, end - 1)) + kDims * lane, policy);
    return r;
}

// Asks L2 for the round from `base` of a warp (load_round's lines: lane l one 128-byte half of
// the K or the V row of position base + l / 4), so that its load, issued a round later, hits L2.
__device__ __forceinline__ void prefetch_round(const bi_bf16 *k_cache, const bi_bf16 *v_cache, int block, int kv_head, int base,
                                               int end) {
    const int lane = threadIdx.x % bi::kWarp;
    const bi_bf16 *cache = lane / 2 % 2 ? v_cache : k_cache;
    const bi_bf16 *line = cache + kv_row(block, kv_head, min(base + lane / 4, end - 1)) + lane % 2 * (BI_HEAD_DIM / 2);
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(line));
}

__device__ __forceinline__ void unpack_dims(float (&dst)[kDims], uint2 raw) {
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

struct Args {
    bi_bf16 *out;             // [rows, 16, 128]
    float *partials;          // [rows, 16, splits, BI_PARTIAL_FLOATS]
    int32_t *counters;        // [rows, 8], zero between launches
    const bi_bf16 *k_cache;   // [blocks, 8, 16, 128] (one layer)
    const bi_bf16 *v_cache;
};

// Query fragments from the bf16 heads [kGroup][128] at `heads` (global or shared memory).
__device__ __forceinline__ void load_query(QueryFragments &qa, const bi_bf16 *heads) {
    const int lane = threadIdx.x % bi::kWarp, g = lane / 4, q = lane % 4;
#pragma unroll
    for (int c = 0; c < kChunks; ++c)
        qa[c] = g < kGroup ? *reinterpret_cast<const uint4 *>(heads + g * BI_HEAD_DIM + 32 * c + 8 * q) : make_uint4(0, 0, 0, 0);
}

// Qwen3's per-head RMSNorm and rotate-half RoPE of one 128-wide head, by a warp: lane l gets
// dims 4l..4l+3 (their rotation partners 64 dims away sit in lane l ^ 16).
__device__ __forceinline__ void norm_rope(float (&out)[kDims], const float *head, const bi_bf16 *norm, int pos,
                                          const float *inv_freq, float eps) {
    const int lane = threadIdx.x % bi::kWarp;
    const float4 x4 = *reinterpret_cast<const float4 *>(head + kDims * lane);
    const float x[kDims] = {x4.x, x4.y, x4.z, x4.w};
    const float inv_rms = rsqrtf(bi::warp_sum(x[0] * x[0] + x[1] * x[1] + x[2] * x[2] + x[3] * x[3]) / BI_HEAD_DIM + eps);
#pragma unroll
    for (int i = 0; i < kDims; ++i) {
        const int d = kDims * lane + i;
        const float y = x[i] * inv_rms * bi::bf16_to_f32(norm[d]);
        const float partner = __shfl_xor_sync(0xffffffffu, y, 16);
        float s, c;
        sincosf(static_cast<float>(pos) * inv_freq[d % (BI_HEAD_DIM / 2)], &s, &c);
        out[i] = lane < 16 ? y * c - partner * s : y * c + partner * s;
    }
}

__device__ __forceinline__ void store_bf16x4(bi_bf16 *dst, const float (&v)[kDims]) {
    *reinterpret_cast<uint2 *>(dst) = make_uint2(bi::pack_bf16x2(v[0], v[1]), bi::pack_bf16x2(v[2], v[3]));
}

// What a decode item needs to prepare its query and the new cache row from the qkv product.
struct Prep {
    const float *qkv;                // [rows, 4096] f32: q 2048 | k 1024 | v 1024
    const bi_bf16 *q_norm, *k_norm;  // [128]
    const float *inv_freq;           // [64]
    float eps;
    bi_bf16 *k_cache, *v_cache;      // the layer's cache (Args' own), where the new row goes
};

// The (row, kv head) work of bi_qk_norm_rope_cache for one decode item, by warps 0 and 1: the
// two query heads normalized and rotated into `heads` (bf16 [kGroup][128], for load_query); with
// `write_kv` (the range that ends at `pos`), then the new K (normalized, rotated; warp 0) and V
// (warp 1) into the cache (table: the row's block table). The caller synchronizes the warps
// before reading either.
__device__ __forceinline__ void prepare_decode_item(bi_bf16 *heads, const Prep &prep, int row, int kv_head, int pos,
                                                    const int32_t *table, bool write_kv) {
    static_assert(kGroup == 2, "warps 0 and 1 also write K and V");
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp;
    if (warp >= kGroup) return;
    const float *qkv = prep.qkv + static_cast<size_t>(row) * (BI_Q_HEADS + 2 * BI_KV_HEADS) * BI_HEAD_DIM;
    float v[kDims];
    norm_rope(v, qkv + (kv_head * kGroup + warp) * BI_HEAD_DIM, prep.q_norm, pos, prep.inv_freq, prep.eps);
    store_bf16x4(heads + warp * BI_HEAD_DIM + kDims * lane, v);
    if (!write_kv) return;
    const size_t kv_offset = kv_row(table[pos / BI_BLOCK_TOKENS], kv_head, pos);
    if (warp == 0) {
        norm_rope(v, qkv + (BI_Q_HEADS + kv_head) * BI_HEAD_DIM, prep.k_norm, pos, prep.inv_freq, prep.eps);
        store_bf16x4(prep.k_cache + kv_offset + kDims * lane, v);
    } else {
        const float4 x = *reinterpret_cast<const float4 *>(qkv + (BI_Q_HEADS + BI_KV_HEADS + kv_head) * BI_HEAD_DIM + kDims * lane);
        store_bf16x4(prep.v_cache + kv_offset + kDims * lane, {x.x, x.y, x.z, x.w});
    }
}

// The attention core for a block's first `Warps` warps (bi::sync_warps): the separate kernel
// runs it with 8, the fused layer kernel with its 16 compute warps.
template <int Warps>
struct Core {
    // Shared memory: the warps' states for the block merge, later the ranges for the final
    // merge; then the query heads, staged as bf16 by callers that hold them in another layout.
    static constexpr int kMergeFloats = kGroup * BI_PARTIAL_FLOATS * (Warps > BI_MAX_SPLITS ? Warps : BI_MAX_SPLITS);
    static constexpr int kSmemFloats = kMergeFloats + kGroup * BI_HEAD_DIM / 2;
    static_assert(Warps * bi::kWarp >= kGroup * BI_HEAD_DIM, "one thread per (head, dim) in the final merge");
    // The shortest range worth a block of its own: one round of all the warps. Decode attention
    // is a chain of dependent memory round trips; a second round per range costs two more of
    // them, which is more than merging more ranges costs (measured in the fused layer kernel at
    // context 1024: two rounds per range 7.3 us per layer, one round: see csrc/layer.cu).
    static constexpr int kMinSplitTokens = Warps * kTokensPerRound;

    // Range `split` of positions [0, pos] when a row is cut into at most `splits` ranges of at
    // least kMinSplitTokens, each starting on a cache block (split >= active: none).
    static __device__ __forceinline__ Range split_range(int pos, int split, int splits) {
        const int kv_len = pos + 1;
        const int most = min(splits, (kv_len + kMinSplitTokens - 1) / kMinSplitTokens);
        const int chunk = ((kv_len + most - 1) / most + BI_BLOCK_TOKENS - 1) / BI_BLOCK_TOKENS * BI_BLOCK_TOKENS;
        const int begin = min(kv_len, split * chunk);
        return {begin, min(kv_len, begin + chunk), (kv_len + chunk - 1) / chunk};
    }

    // The warp's first round of range `split` of a row (table: its block table), to be read early
    // (before the query, and in the fused kernel before the new K/V row is written: attend_split
    // reads the round holding `pos` again).
    static __device__ __forceinline__ Round first_round(const Args &args, const int32_t *table, int kv_head, int split, int splits, int pos) {
        const auto [begin, end, active] = split_range(pos, split, splits);
        const int base = begin + threadIdx.x / bi::kWarp * kTokensPerRound;
        if (split >= active || base >= end) return {};
        return load_round(args.k_cache, args.v_cache, table[base / BI_BLOCK_TOKENS], kv_head, base, end);
    }

    // The block's share of rows [0, pos] of `row` for `kv_head`: range `split` of at most `splits`.
    // qa: the query fragments (load_query). table: the row's block table; first: first_round's.
    // smem: kSmemFloats floats. All Warps warps. Prefetch: the next round's loads are in flight
    // while a round computes (64 registers of rounds). The fused layer kernel has no registers to
    // spare for it; it asks L2 for the next round instead (one prefetch per lane), which ran the
    // decode sweep at batch 8 / 16 2% faster at context 512 (8,197 -> 8,370, 13,360 -> 13,623
    // tok/s) and 7.4-8.3% at 2,048 (5,496 -> 5,903, 7,650 -> 8,288; H200); two or three
    // rounds ahead gained less or lost, and L2 prefetches two or three rounds ahead of the
    // register prefetch slowed the separate kernel (batch 64: 25,904 -> 25,180 / 24,501).
    template <bool Prefetch>
    static __device__ __forceinline__ void attend_split(const Args &args, int row, int kv_head, int split, int splits, int pos,
                                                 const int32_t *table, const QueryFragments &qa, const Round &first,
                                                 float *smem) {
        const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp;
        const int g = lane / 4, q = lane % 4;
        const auto [begin, end, active] = split_range(pos, split, splits);
        if (split >= active) return;  // no range: the `active` others complete the row
        float *partials = args.partials;
        bi_bf16 *out = args.out;
        const float scale = rsqrtf(static_cast<float>(BI_HEAD_DIM)) * kLog2e;  // scores in base 2

        // Running softmax of this warp's positions, per head: the max (every lane), the sum (spread
        // over the 4 lanes of the head's quad: lanes 4h..4h+3), and this lane's dims.
        float run_max[kGroup] = {-INFINITY, -INFINITY}, run_sum = 0.0f, acc[kGroup][kDims] = {};
        constexpr int kStride = Warps * kTokensPerRound;
        auto round_at = [&, end = end](int base) {
            return load_round(args.k_cache, args.v_cache, table[base / BI_BLOCK_TOKENS], kv_head, base, end);
        };
        Round kv = first;
        const int first_base = begin + warp * kTokensPerRound;
        if (first_base < end && first_base + kTokensPerRound > pos) kv = round_at(first_base);  // holds `pos`: maybe read before it was written
        for (int base = first_base; base < end; base += kStride) {
            if (!Prefetch && base != first_base) kv = round_at(base);
            if (!Prefetch && base + kStride < end)
                prefetch_round(args.k_cache, args.v_cache, table[(base + kStride) / BI_BLOCK_TOKENS], kv_head, base + kStride, end);
            Round next;
            if constexpr (Prefetch) next = base + kStride < end ? round_at(base + kStride) : Round{};
            // Scores: lane (g < 2, q) gets head g at positions base + 2q and base + 2q + 1.
            float s[4] = {};
    #pragma unroll
            for (int c = 0; c < kChunks; ++c) {
                bi::mma_bf16(s, qa[c].x, 0u, qa[c].y, 0u, kv.k[c].x, kv.k[c].y);
                bi::mma_bf16(s, qa[c].z, 0u, qa[c].w, 0u, kv.k[c].z, kv.k[c].w);
            }
            const float s0 = base + 2 * q < end ? s[0] * scale : -INFINITY;
            const float s1 = base + 2 * q + 1 < end ? s[1] * scale : -INFINITY;
            float round_max = fmaxf(s0, s1);
            round_max = fmaxf(round_max, __shfl_xor_sync(0xffffffffu, round_max, 1));
            round_max = fmaxf(round_max, __shfl_xor_sync(0xffffffffu, round_max, 2));
            float new_max[kGroup], correction[kGroup];
    #pragma unroll
            for (int h = 0; h < kGroup; ++h) {
                new_max[h] = fmaxf(run_max[h], __shfl_sync(0xffffffffu, round_max, 4 * h));  // finite: base < end
                correction[h] = exp2f(run_max[h] - new_max[h]);
                run_max[h] = new_max[h];
            }
            // This lane's head (lanes of rows 2..15 compute what nobody reads).
            const float own_max = g == 1 ? new_max[1] : new_max[0], own_correction = g == 1 ? correction[1] : correction[0];
            const float p0 = exp2f(s0 - own_max), p1 = exp2f(s1 - own_max);
            run_sum = run_sum * own_correction + p0 + p1;
    #pragma unroll
            for (int h = 0; h < kGroup; ++h)
    #pragma unroll
                for (int d = 0; d < kDims; ++d) acc[h][d] *= correction[h];
    #pragma unroll
            for (int j = 0; j < kTokensPerRound; ++j) {
                float v[kDims];
                unpack_dims(v, kv.v[j]);
    #pragma unroll
                for (int h = 0; h < kGroup; ++h) {
                    const float p = __shfl_sync(0xffffffffu, j % 2 ? p1 : p0, 4 * h + j / 2);
    #pragma unroll
                    for (int d = 0; d < kDims; ++d) acc[h][d] += p * v[d];
                }
            }
            if constexpr (Prefetch) kv = next;
        }
        run_sum += __shfl_xor_sync(0xffffffffu, run_sum, 1);
        run_sum += __shfl_xor_sync(0xffffffffu, run_sum, 2);

        // Merge the warps (one thread per head and dim), then write this range's partial.
        auto warp_state = reinterpret_cast<float (*)[kGroup][BI_PARTIAL_FLOATS]>(smem);  // [Warps]
    #pragma unroll
        for (int h = 0; h < kGroup; ++h) {
            if (lane == 4 * h) warp_state[warp][h][0] = run_max[h], warp_state[warp][h][1] = run_sum;
    #pragma unroll
            for (int d = 0; d < kDims; ++d) warp_state[warp][h][2 + lane * kDims + d] = acc[h][d];
        }
        bi::sync_warps<Warps>();
        const int h = threadIdx.x / BI_HEAD_DIM, d = threadIdx.x % BI_HEAD_DIM;
        if (h < kGroup) {
            float best = -INFINITY;
    #pragma unroll
            for (int w = 0; w < Warps; ++w) best = fmaxf(best, warp_state[w][h][0]);
            float sum = 0.0f, merged = 0.0f;
            if (best != -INFINITY) {
    #pragma unroll
                for (int w = 0; w < Warps; ++w) {
                    const float scale_w = warp_state[w][h][0] == -INFINITY ? 0.0f : exp2f(warp_state[w][h][0] - best);
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
        bi::sync_warps<Warps>();
        if (threadIdx.x == 0) {
            int32_t *counter = args.counters + static_cast<size_t>(row) * BI_KV_HEADS + kv_head;
            int before;
            asm volatile("atom.acq_rel.gpu.add.s32 %0, [%1], 1;\n" : "=r"(before) : "l"(counter) : "memory");
            last = before == active - 1;
            if (last) *counter = 0;  // ready for the next launch
        }
        bi::sync_warps<Warps>();
        if (!last) return;
        // Stage the ranges of both heads with parallel loads (L2: other blocks wrote them), then merge.
        auto staged = reinterpret_cast<float (*)[BI_MAX_SPLITS][BI_PARTIAL_FLOATS]>(smem);  // [kGroup]
        const float *ranges = partials + (static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup) * splits * BI_PARTIAL_FLOATS;
        for (int i = threadIdx.x; i < kGroup * active * BI_PARTIAL_FLOATS; i += Warps * bi::kWarp) {
            const int head = i / (active * BI_PARTIAL_FLOATS), rest = i % (active * BI_PARTIAL_FLOATS);
            staged[head][rest / BI_PARTIAL_FLOATS][rest % BI_PARTIAL_FLOATS] = __ldcg(ranges + head * splits * BI_PARTIAL_FLOATS + rest);
        }
        bi::sync_warps<Warps>();
        if (h < kGroup) combine(out + (static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup + h) * BI_HEAD_DIM, staged[h], active, d);
    }
};

}  // namespace bi::attn
