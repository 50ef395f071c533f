// Linear layers on tensor cores: out = a[m, k] . w[n, k]^T with f32 accumulation (mma.sync
// m16n8k16 bf16, or wgmma on Hopper for the tiled products), and a fused epilogue (store,
// residual add, or SwiGLU). Weights are bf16, or INT8 converted to bf16 fragments in registers
// with the row scale applied to the sum.
//
// Two tilings of the same product, picked by m (and bi_placement):
// - skinny (m <= 16, and the layer products up to m = 32 when alone): weights stream straight
//   from global memory into mma fragments with 16-byte loads; each block owns 8*TN weight rows
//   and its warps split k. The k axis is permuted inside every 32-column chunk (same
//   permutation for a and w, so the dot product is unchanged): a thread's 8 contiguous bf16
//   feed two k16 steps. At m = 1 the tensor core wastes 15/16 of its rows, which costs nothing
//   in a memory-bound product.
// - tiled (m > 32, layer products of 17-32 rows beside another chain, the LM head above m = 16,
//   prefill): 64/128-row x 128-column block tiles through a deep cp.async pipeline (wgmma, or
//   ldmatrix + mma.sync), k split across blocks when the tiles alone leave SMs idle. (At m = 64
//   the skinny kernel re-read the activations in every block: 89 us per layer on an H200, ncu,
//   against 43 us tiled; at m = 32 alone, skinny with its fused RMSNorm is the faster step:
//   15,588 against 14,581 tok/s at batch 32, context 512.)
#include <cooperative_groups.h>

#include <algorithm>

#include "matvec.cuh"
#include "wgmma.cuh"

namespace {

using bi::cp_async16;
using bi::kChunk;
using bi::ldmatrix_x4;
using bi::mma_bf16;
using bi::store_pair;
namespace wgmma = bi::wgmma;

// ---------------------------------------------------------------------------------------------
// Skinny: grid n / (8*TN) blocks of WARPS warps; warp w covers k columns [w*k/WARPS, (w+1)*k/WARPS).
// With Norm, the A operand is the f32 residual stream normalized on the fly (RMSNorm fused into
// the product: each block reduces the rows' sums of squares itself, while its first weight
// loads are in flight).

struct SkinnyArgs {
    void *out;
    const void *a;             // bf16 [m, k], or with Norm f32 [m, k]
    const bi_bf16 *norm;       // with Norm: [k]
    bi_matrix w;               // [n, k]
    int m, n, k;
    float eps;

    __device__ bi::Activations activations() const { return {a, norm, m, k}; }
};

// Unroll: 16-byte weight loads per weight row a thread has in flight at once. A load spans
// kSpan columns of the warp's k range: lane q's bytes are columns kSpan * l + 8 * kPerLoad * q
// and on (one 32-column chunk per load of bf16 weights; two of INT8 ones, whose 8-byte loads
// had the load queue throttle the SMs: the LM head streamed at 41% of the copy bandwidth).
template <int MT, int TN, int Warps, int Unroll, int Epilogue, bool Norm, typename W>
__global__ void __launch_bounds__(Warps * bi::kWarp) skinny_kernel(SkinnyArgs args) {
    using Chunk = bi::WeightChunk<W>;
    constexpr int kPerLoad = Chunk::kPerLoad, kSpan = kChunk * kPerLoad;
    static_assert(Warps * MT * TN <= 64, "the cross-warp reduction must fit 32 KiB of shared memory");
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp;
    const int g = lane / 4, q = lane % 4;  // mma fragment coordinates
    const int n0 = blockIdx.x * 8 * TN;
    const int k_warp = args.k / Warps;
    const int k_begin = warp * k_warp + 8 * kPerLoad * q;

    bi::allow_next_kernel();
    __shared__ float inv_rms[MT * 16];
    float acc[MT][TN][4] = {};
    const W *w_rows[TN];
#pragma unroll
    for (int t = 0; t < TN; ++t)
        w_rows[t] = static_cast<const W *>(args.w.values) + static_cast<size_t>(n0 + t * 8 + g) * args.k + k_begin;

    for (int c0 = 0; c0 < k_warp; c0 += kSpan * Unroll) {
        uint4 wv[Unroll][TN];
#pragma unroll
        for (int l = 0; l < Unroll; ++l)
#pragma unroll
            for (int t = 0; t < TN; ++t)
                wv[l][t] = c0 + l * kSpan < k_warp ? bi::load_stream(w_rows[t] + c0 + l * kSpan) : uint4{};
        if (c0 == 0) {
            // Weights never depend on the previous kernel: the first loads are in flight before
            // the wait for the activations it writes.
            bi::wait_for_previous_kernel();
            if constexpr (Norm) {
                bi::row_inv_rms(args.activations(), args.eps, inv_rms);
                __syncthreads();
            }
        }
#pragma unroll
        for (int u = 0; u < Unroll * kPerLoad; ++u) {
            const int l = u / kPerLoad, part = u % kPerLoad;
            if (c0 + l * kSpan >= k_warp) break;
            const int col = k_begin + c0 + l * kSpan + 8 * part;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const uint4 lo = bi::a_chunk<Norm>(args.activations(), mt * 16 + g, col, inv_rms);
                const uint4 hi = bi::a_chunk<Norm>(args.activations(), mt * 16 + g + 8, col, inv_rms);
#pragma unroll
                for (int t = 0; t < TN; ++t) {
                    const uint4 b = Chunk::bf16(Chunk::part(wv[l][t], part));
                    mma_bf16(acc[mt][t], lo.x, hi.x, lo.y, hi.y, b.x, b.y);
                    mma_bf16(acc[mt][t], lo.z, hi.z, lo.w, hi.w, b.z, b.w);
                }
            }
        }
    }

    // Sum the warps' partial products in a fixed order; warp 0 applies the epilogue.
    __shared__ float partial[Warps][MT * TN * 4][bi::kWarp];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int t = 0; t < TN; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) partial[warp][(mt * TN + t) * 4 + e][lane] = acc[mt][t][e];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int t = 0; t < TN; ++t) {
            float v[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int idx = (mt * TN + t) * 4 + e;
                v[e] = 0.0f;
#pragma unroll
                for (int w = 0; w < Warps; ++w) v[e] += partial[w][idx][lane];
            }
            const int row = mt * 16 + g, col = n0 + t * 8 + 2 * q;
            const float2 s = bi::column_scales<W>(args.w.scales, col);
            if (row < args.m) store_pair<Epilogue>(args.out, args.n, row, col, v[0] * s.x, v[1] * s.y);
            if (row + 8 < args.m) store_pair<Epilogue>(args.out, args.n, row + 8, col, v[2] * s.x, v[3] * s.y);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tiled: BM x 128 output tiles (BM 64 or 128) through a cp.async pipeline as deep as two
// blocks per SM allow. On Hopper they run on wgmma (two warpgroups, tiles in the 128-byte
// swizzle; INT8 weight tiles converted to bf16 in shared memory first); on other GPUs on
// mma.sync (8 warps of (BM/2) x 32; bf16 weight fragments from ldmatrix, INT8 ones read two
// bytes at a time and converted).
// Decode products stream their weights, and the bytes each SM has in flight set their
// bandwidth: hence the deep pipelines and k steps of 64. When the tiles are too few to fill the
// SMs (decode batches against the 1,024-wide products), the k axis is split over gridDim.z
// blocks that form one thread-block cluster per tile: each leaves its partial sums in its shared
// memory, and after the cluster barrier each adds up a share of the tile over the cluster in
// split order (the result does not depend on timing) and applies the epilogue.

constexpr int kTiledThreads = 256;
constexpr int kTileN = 128;  // columns per tile
constexpr int kTiledK = 64;  // k per pipeline stage
constexpr int kTiledSmem = 110 * 1024;  // per block: two blocks fit an SM
constexpr int kMaxSplits = 8;
constexpr int kMinSplitKTiles = 4;  // k steps per split: shorter ones leave the pipeline empty

// mma.sync tiles.
template <typename W, int BM>
struct Tile {
    static constexpr int kMT = BM / 32, kNT = kTileN / 32;  // m16 and n8 fragments per warp
    static constexpr int kFragments = kMT * kNT;  // x 4 accumulators x 256 threads = BM * kTileN
    static_assert(BM * kTileN * 4 <= kTiledSmem, "split k leaves a tile of f32 partials in shared memory");
    // Padded smem rows: bf16 rows of kTiledK + 8 (ldmatrix's 8 rows fall in distinct banks);
    // INT8 weight rows of kTiledK + 16 bytes (so do the 8 rows of a fragment read).
    static constexpr int kAPitch = kTiledK + 8;  // bf16
    static constexpr int kWPitch = sizeof(W) == 1 ? kTiledK + 16 : kAPitch * 2;  // bytes
    static constexpr int kABytes = BM * kAPitch * 2;
    static constexpr int kStageBytes = kABytes + kTileN * kWPitch;
    // As many stages as fit: a product of few rows streams its weights, and the bytes each SM
    // has in flight are what set its bandwidth (4 stages of 64x64 reached 15% of DRAM
    // bandwidth: ncu, H200).
    static constexpr int kStages = kTiledSmem / kStageBytes;
    static constexpr size_t kSmem = kStages * kStageBytes;
    static_assert(kStages >= 3, "the pipeline needs three stages");
    static_assert(kNT % 2 == 0, "bf16 B fragments come two n8 tiles per ldmatrix.x4");
    static_assert(kAPitch * 2 % 16 == 0 && kWPitch % 16 == 0, "smem rows stay 16-byte aligned for cp.async");
};

// wgmma tiles: warpgroup g multiplies rows 64g.. of A by all 128 columns (BM = 128), or all 64 rows
// by columns 64g.. (BM = 64). A stage's A rows are one swizzled row each (kTiledK bf16); so are
// its bf16 weight rows. INT8 weight rows land densely (kTiledK bytes) and are converted, exactly,
// into one swizzled bf16 tile after the stages before each stage's wgmma. Against INT8 on
// mma.sync (the conversion in registers, per warp): a 2,000-token prefill 142,252 -> 163,378
// tok/s, decode at batch 64 / 128 / 256 24,033 / 33,853 / 41,354 -> 25,940 / 36,164 / 43,726
// (context 512; H200, same-run A/B, means of two repeats). bf16: 205,811 tok/s and 28,058 /
// 39,209 / 46,683.
template <typename W, int BM>
struct WgmmaTile {
    static constexpr bool kConverts = sizeof(W) == 1;
    static constexpr int kN = BM == 128 ? kTileN : kTileN / 2;  // columns per warpgroup
    static constexpr int kFragments = kN / 8;
    static constexpr int kABytes = BM * wgmma::kRowBytes;
    static constexpr int kStageBytes = kABytes + kTileN * kTiledK * static_cast<int>(sizeof(W));
    static constexpr int kConvertedBytes = kConverts ? kTileN * wgmma::kRowBytes : 0;
    static constexpr int kStages = (kTiledSmem - wgmma::kAlign - kConvertedBytes) / kStageBytes;
    static constexpr size_t kSmem = kStages * kStageBytes + kConvertedBytes + wgmma::kAlign;  // + room to align the base
    static_assert(kTiledK * 2 == wgmma::kRowBytes, "a stage row is one swizzled row");
    static_assert(kStageBytes % wgmma::kAlign == 0, "every stage's tiles keep the swizzle's alignment");
    static_assert(kFragments * 4 * kTiledThreads * 4 <= kStages * kStageBytes, "split k's partials fit the stages");
    static_assert(kStages >= 3, "the pipeline needs three stages");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // wgmma_kernel's only, like its body
// A stage's dense INT8 weight tile [kTileN][kTiledK] into the swizzled bf16 tile `out` (every
// thread: half a row, two 16-byte loads and four 16-byte stores).
__device__ __forceinline__ void convert_weight_tile(const int8_t *tile, unsigned char *out) {
    static_assert(kTileN * 2 == kTiledThreads && kTiledK == 64, "a thread converts 32 weights of a row");
    using Chunk = bi::WeightChunk<int8_t>;
    const int row = threadIdx.x / 2, half = threadIdx.x % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const uint4 raw = *reinterpret_cast<const uint4 *>(tile + row * kTiledK + 32 * half + 16 * i);
#pragma unroll
        for (int part = 0; part < 2; ++part)
            *reinterpret_cast<uint4 *>(out + wgmma::swizzled(row, 4 * half + 2 * i + part)) = Chunk::bf16(Chunk::part(raw, part));
    }
}
#endif

struct TiledArgs {
    void *out;
    const bi_bf16 *a;  // [m, k]
    bi_matrix w;       // [n, k]
    int m, n, k;
    // The grid's order (launch_tiles sets it): row tiles along x where the weights outgrow L2,
    // so that the row tiles of one weight tile run side by side and it comes from DRAM once (the
    // LM head at 256 rows: 214.5 -> 177.8 us, its two 128-row tiles having each read all 311 MB;
    // H200); column tiles along x otherwise (prefill of 2,000 tokens, whose products fit L2:
    // 45,524 tok/s, against 45,328 with row tiles along x).
    bool rows_along_x = false;

    // Row and column of this block's tile's first element.
    __device__ int2 origin(int bm) const {
        return rows_along_x ? make_int2(blockIdx.x * bm, blockIdx.y * kTileN) : make_int2(blockIdx.y * bm, blockIdx.x * kTileN);
    }
};

// This thread's 16-byte copies of a stage's Rows x kTiledK slice of a [rows, k] matrix, rows
// from row0: the source at k = 0, the smem offset (offset(row, chunk)), and whether the row
// exists (rows past the matrix are zero-filled). Computed once: recomputing the addresses per
// stage cost more issue slots than the stage's mma.
template <typename T, int Rows>
struct TileCopy {
    static constexpr int kChunks = kTiledK * sizeof(T) / 16;  // per row
    static constexpr int kIters = Rows * kChunks / kTiledThreads;
    static_assert(Rows * kChunks % kTiledThreads == 0, "whole chunks per thread");
    const T *src[kIters];
    int dst[kIters];
    bool valid[kIters];

    template <typename Offset>
    __device__ __forceinline__ TileCopy(const T *matrix, int row0, int rows, int k, Offset offset) {
#pragma unroll
        for (int i = 0; i < kIters; ++i) {
            const int chunk = threadIdx.x + i * kTiledThreads, row = chunk / kChunks, c = chunk % kChunks;
            src[i] = matrix + static_cast<size_t>(min(row0 + row, rows - 1)) * k + c * 16 / sizeof(T);
            dst[i] = offset(row, c);
            valid[i] = row0 + row < rows;
        }
    }
    // Copies k step kt into `stage`.
    __device__ __forceinline__ void issue(unsigned char *stage, int kt) const {
#pragma unroll
        for (int i = 0; i < kIters; ++i) cp_async16(stage + dst[i], src[i] + kt * kTiledK, valid[i]);
    }
};

// The k loop of both tiled kernels over k steps [kt_begin, kt_end): a ring of kStages stages at
// `smem` (weights at `w_offset` in each), compute(stage) consuming one landed stage. The first
// stages' weights load before the wait for the previous kernel (they never depend on it); each
// stage's group then closes with its activations (the first group holds every early weight
// load, so waiting for it waits for all of them). A stage is refilled one iteration after its
// compute, behind the barrier every thread passes when done with it. AsyncReads: the stages are
// read by the async proxy (wgmma), which sees the copies only after a proxy fence.
template <int kStages, int kStageBytes, bool AsyncReads, typename ACopy, typename WCopy, typename Compute>
__device__ __forceinline__ void tiled_pipeline(unsigned char *smem, int w_offset, const ACopy &a_copy, const WCopy &w_copy,
                                               int kt_begin, int kt_end, Compute compute) {
    auto stage = [&](int s) { return smem + s * kStageBytes; };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s)
        if (kt_begin + s < kt_end) w_copy.issue(stage(s) + w_offset, kt_begin + s);
    bi::wait_for_previous_kernel();
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (kt_begin + s < kt_end) a_copy.issue(stage(s), kt_begin + s);
        asm volatile("cp.async.commit_group;\n");
    }
    for (int kt = kt_begin; kt < kt_end; ++kt) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 2));
        if constexpr (AsyncReads) wgmma::fence_shared_writes();
        __syncthreads();
        const int next = kt + kStages - 1;
        if (next < kt_end) {
            unsigned char *refill = stage((next - kt_begin) % kStages);
            w_copy.issue(refill + w_offset, next);
            a_copy.issue(refill, next);
        }
        asm volatile("cp.async.commit_group;\n");
        compute(stage((kt - kt_begin) % kStages));
    }
    asm volatile("cp.async.wait_group 0;\n");
}

// Split k: the fragments [first, last) of the tile this block stores, after adding them up over
// the tile's cluster (acc then holds the sums there). smem: the pipeline's, no longer in use.
template <int kFragments>
__device__ __forceinline__ int2 reduce_splits(float (&acc)[kFragments][4], float *smem) {
    namespace cg = cooperative_groups;
    const cg::cluster_group cluster = cg::this_cluster();
    const int splits = static_cast<int>(cluster.num_blocks()), z = static_cast<int>(cluster.block_rank());
    auto at = [&](float *base, int f, int e) { return base + (f * 4 + e) * kTiledThreads + threadIdx.x; };  // coalesced
#pragma unroll
    for (int f = 0; f < kFragments; ++f)
#pragma unroll
        for (int e = 0; e < 4; ++e) *at(smem, f, e) = acc[f][e];
    cluster.sync();  // every split's partial is in place
    const int2 share = {z * kFragments / splits, (z + 1) * kFragments / splits};
#pragma unroll
    for (int f = 0; f < kFragments; ++f) {
        if (f < share.x || f >= share.y) continue;
        float part[kMaxSplits][4];  // all loads first: one round trip
#pragma unroll
        for (int s = 0; s < kMaxSplits; ++s)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[s][e] = s < splits ? *at(cluster.map_shared_rank(smem, s), f, e) : 0.0f;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float sum = 0.0f;
#pragma unroll
            for (int s = 0; s < kMaxSplits; ++s)
                if (s < splits) sum += part[s][e];
            acc[f][e] = sum;
        }
    }
    cluster.sync();  // no block leaves while another reads its shared memory
    return share;
}

// After the k loop: adds the splits up (if any) and applies the epilogue to this thread's
// fragments; fragment f's four values are (row, col), (row, col + 1), (row + 8, col), (row + 8,
// col + 1) with {row, col} = origin(f).
template <int Epilogue, typename W, int kFragments, typename Origin>
__device__ __forceinline__ void finish_tile(const TiledArgs &args, float (&acc)[kFragments][4], unsigned char *smem,
                                            Origin origin) {
    int2 share = {0, kFragments};
    if (gridDim.z > 1) {
        __syncthreads();  // the last stage's reads are done before the partials overwrite it
        share = reduce_splits(acc, reinterpret_cast<float *>(smem));
    }
#pragma unroll
    for (int f = 0; f < kFragments; ++f) {
        if (f < share.x || f >= share.y) continue;
        const int2 at = origin(f);
        if (at.y >= args.n) continue;
        const float2 s = bi::column_scales<W>(args.w.scales, at.y);
        if (at.x < args.m) store_pair<Epilogue>(args.out, args.n, at.x, at.y, acc[f][0] * s.x, acc[f][1] * s.y);
        if (at.x + 8 < args.m) store_pair<Epilogue>(args.out, args.n, at.x + 8, at.y, acc[f][2] * s.x, acc[f][3] * s.y);
    }
}

// The k steps of split blockIdx.z.
__device__ __forceinline__ int2 split_k_steps(int k) {
    const int k_tiles = k / kTiledK, splits = static_cast<int>(gridDim.z), z = static_cast<int>(blockIdx.z);
    return {z * k_tiles / splits, (z + 1) * k_tiles / splits};
}

// grid (n / kTileN, m / BM rounded up, splits).
template <int Epilogue, typename W, int BM>
__global__ void __launch_bounds__(kTiledThreads) tiled_kernel(TiledArgs args) {
    using T = Tile<W, BM>;
    extern __shared__ __align__(16) unsigned char smem[];
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp;
    const int wm = warp / 4, wn = warp % 4;  // warp tile: rows wm*BM/2.., cols wn*kTileN/4..
    const int m0 = args.origin(BM).x, n0 = args.origin(BM).y;
    bi::allow_next_kernel();

    const TileCopy<bi_bf16, BM> a_copy(args.a, m0, args.m, args.k, [](int r, int c) { return (r * T::kAPitch + c * 8) * 2; });
    const TileCopy<W, kTileN> w_copy(static_cast<const W *>(args.w.values), n0, args.n, args.k,
                                     [](int r, int c) { return r * T::kWPitch + 16 * c; });
    float acc[T::kFragments][4] = {};  // fragment mt * kNT + nt
    const int2 steps = split_k_steps(args.k);
    tiled_pipeline<T::kStages, T::kStageBytes, false>(smem, T::kABytes, a_copy, w_copy, steps.x, steps.y, [&](unsigned char *stage) {
        const bi_bf16 *sa = reinterpret_cast<const bi_bf16 *>(stage);
        const unsigned char *sw = stage + T::kABytes;
#pragma unroll
        for (int ks = 0; ks < kTiledK; ks += 16) {
            uint32_t af[T::kMT][4], bf[T::kNT][2];  // bf[nt]: the two B registers of n8 tile nt
#pragma unroll
            for (int mt = 0; mt < T::kMT; ++mt)
                ldmatrix_x4(af[mt], sa + (wm * (BM / 2) + mt * 16 + lane % 16) * T::kAPitch + ks + (lane / 16) * 8);
            if constexpr (sizeof(W) == 2) {
#pragma unroll
                for (int np = 0; np < T::kNT / 2; ++np) {  // two n8 tiles per ldmatrix.x4
                    uint32_t r[4];
                    ldmatrix_x4(r, reinterpret_cast<const bi_bf16 *>(sw) +
                                       (wn * (kTileN / 4) + np * 16 + lane % 8 + (lane / 16) * 8) * T::kAPitch + ks + ((lane / 8) % 2) * 8);
                    bf[2 * np][0] = r[0], bf[2 * np][1] = r[1], bf[2 * np + 1][0] = r[2], bf[2 * np + 1][1] = r[3];
                }
            } else {
                const int g = lane / 4, q = lane % 4;  // B fragment: row g, k 2q, 2q + 1 and 2q + 8, 2q + 9
#pragma unroll
                for (int nt = 0; nt < T::kNT; ++nt) {
                    const unsigned char *row = sw + (wn * (kTileN / 4) + nt * 8 + g) * T::kWPitch + ks + 2 * q;
                    bf[nt][0] = bi::int8x2_to_bf16x2(*reinterpret_cast<const uint16_t *>(row));
                    bf[nt][1] = bi::int8x2_to_bf16x2(*reinterpret_cast<const uint16_t *>(row + 8));
                }
            }
#pragma unroll
            for (int mt = 0; mt < T::kMT; ++mt)
#pragma unroll
                for (int nt = 0; nt < T::kNT; ++nt)
                    mma_bf16(acc[mt * T::kNT + nt], af[mt][0], af[mt][1], af[mt][2], af[mt][3], bf[nt][0], bf[nt][1]);
        }
    });
    const int g = lane / 4, q = lane % 4;
    finish_tile<Epilogue, W>(args, acc, smem, [&](int f) {
        return make_int2(m0 + wm * (BM / 2) + f / T::kNT * 16 + g, n0 + wn * (kTileN / 4) + f % T::kNT * 8 + 2 * q);
    });
}

// The same tiles on wgmma (sm_90a): grid and split k as tiled_kernel's.
template <int Epilogue, typename W, int BM>
__global__ void __launch_bounds__(kTiledThreads) wgmma_kernel(TiledArgs args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using T = WgmmaTile<W, BM>;
    extern __shared__ __align__(16) unsigned char smem_unaligned[];
    const uint32_t misalign = static_cast<uint32_t>(__cvta_generic_to_shared(smem_unaligned)) % wgmma::kAlign;
    unsigned char *smem = smem_unaligned + (wgmma::kAlign - misalign) % wgmma::kAlign;
    unsigned char *converted = smem + T::kStages * T::kStageBytes;  // INT8: the stage's weights in bf16
    const int wg = threadIdx.x / 128, warp = threadIdx.x / bi::kWarp % 4, lane = threadIdx.x % bi::kWarp;
    const int m0 = args.origin(BM).x, n0 = args.origin(BM).y;
    bi::allow_next_kernel();

    const TileCopy<bi_bf16, BM> a_copy(args.a, m0, args.m, args.k, wgmma::swizzled);
    const TileCopy<W, kTileN> w_copy(static_cast<const W *>(args.w.values), n0, args.n, args.k, [](int r, int c) {
        return T::kConverts ? r * kTiledK + 16 * c : wgmma::swizzled(r, c);
    });
    // This warpgroup's rows of the A tile and of the weight tile (BM = 128: rows 64 wg.. of A;
    // BM = 64: rows 64 wg.. of the weights, i.e. its 64 output columns).
    const int a_rows = BM == 128 ? 64 * wg : 0, w_rows = BM == 128 ? 0 : 64 * wg;
    float acc[T::kFragments][4] = {};
    const int2 steps = split_k_steps(args.k);
    tiled_pipeline<T::kStages, T::kStageBytes, true>(smem, T::kABytes, a_copy, w_copy, steps.x, steps.y, [&](unsigned char *stage) {
        const unsigned char *weights = stage + T::kABytes;
        if constexpr (T::kConverts) {
            // The last stage's wgmma are done: every thread passed the pipeline's barrier after
            // waiting for its own.
            convert_weight_tile(reinterpret_cast<const int8_t *>(weights), converted);
            wgmma::fence_shared_writes();
            __syncthreads();
            weights = converted;
        }
        const unsigned char *sa = stage + a_rows * wgmma::kRowBytes, *sw = weights + w_rows * wgmma::kRowBytes;
        wgmma::fence();
#pragma unroll
        for (int ks = 0; ks < kTiledK; ks += 16) wgmma::mma_async<T::kN>(acc, wgmma::descriptor(sa, ks), wgmma::descriptor(sw, ks));
        wgmma::commit();
        wgmma::wait_all();
    });
    const int g = lane / 4, q = lane % 4;
    finish_tile<Epilogue, W>(args, acc, smem, [&](int f) {
        return make_int2(m0 + a_rows + 16 * warp + g, n0 + w_rows + 8 * f + 2 * q);
    });
#endif
}

// ---------------------------------------------------------------------------------------------

// Warps per block: `base`, halved until the cross-warp reduction fits its shared memory.
constexpr int fitted_warps(int base, int mt, int tn) { return base * mt * tn <= 64 ? base : fitted_warps(base / 2, mt, tn); }

template <int MT, int TN, int BaseWarps, int Unroll, int Epilogue, bool Norm>
cudaError_t launch_skinny_shape(const SkinnyArgs &args, bi::Start start, cudaStream_t stream) {
    constexpr int warps = fitted_warps(BaseWarps, MT, TN);
    if (args.n % (8 * TN) != 0) return cudaErrorInvalidValue;
    return bi::with_weight_type(args.w, [&](auto type) {
        using W = decltype(type);
        if (args.k % (warps * kChunk * bi::WeightChunk<W>::kPerLoad) != 0) return cudaErrorInvalidValue;
        return bi::launch_from(start, skinny_kernel<MT, TN, warps, Unroll, Epilogue, Norm, W>, dim3(args.n / (8 * TN)),
                               dim3(warps * bi::kWarp), 0, stream, dim3(1, 1, 1), args);
    });
}

// Widest n of a layer product (gate/up has 6144); wider products are the LM head, whose skinny
// shapes and launch differ, and which runs tiled from BI_SKINNY_ROWS + 1 rows (launch_linear).
constexpr int kSkinnyWidest = 8192;

// Shapes picked so that each product is about one wave of two blocks per SM (132 SMs) with
// every warp holding 4-8 weight loads in flight: gate/up (6144) in 24-row blocks and qkv (4096)
// in 16-row blocks of 8 warps; the 1024-row products in 8-row blocks of 16 warps splitting k.
// Above 8 activation rows (the 9-16-row chains of batches 17-32), where every block reading all
// the rows costs more than a block's weights, blocks four times as wide: qkv and gate/up in
// 64-row blocks of 8 warps, the 1024-row products in 32-row blocks of 16 warps (H100, context
// 512, same run: batch 17 / 24 / 32 9,794 / 13,749 / 17,186 -> 10,527 / 14,200 / 17,737 tok/s;
// only qkv and gate/up widened 10,012 / 13,863 / 17,361; the 1024-row products in 16-row blocks
// instead 10,372 / 14,349 / 17,908. In an earlier run (batch 32: 17,178 / 17,200 on the old
// shapes), qkv and gate/up in 64-row blocks with one load in flight per row tile: 17,512 / 17,539
// alone, 17,456 / 17,467 with the 1024-row products in 32-row blocks of two loads, 15,795 /
// 15,917 with them in 64-row blocks; those 32-row blocks alone 16,617 / 16,598. Products of
// 17-32 rows beside another chain on these shapes instead of tiled, batch 48 / 64: 15,511 /
// 18,349 against 19,901 / 24,093.)
// The LM head (151936 rows) in blocks of 8 warps, of 32 rows up to 8 activation rows, of 64
// above (each A chunk then serves 8 tiles); the same 8 warps at every m, so that a row's sums
// never depend on m (batch invariance). It starts after the previous kernel: launched early it
// made the whole step 10-12% slower at batch 1-16 (1,212 / 4,433 / 7,513 / 11,837 against
// 1,350 / 4,960 / 8,301 / 12,961 tok/s at batch 1 / 4 / 8 / 16 with the earlier 16-row blocks
// of 4 warps; context 512, H200; the last layer letting it start only at its down product did
// not help), while the one-wave layer products gain from starting early (batch 32, every
// skinny product after the previous kernel: 18,570 -> 16,870 tok/s). After it, blocks of 64
// rows: batch 16 12,886 -> 13,334 tok/s (batch 1 1,348 -> 1,325, so 32 rows there: 1,348).
template <int MT, int Epilogue, bool Norm>
cudaError_t launch_skinny(const SkinnyArgs &args, cudaStream_t stream) {
    using bi::Start;
    if (args.n > kSkinnyWidest)
        return args.m > 8 ? launch_skinny_shape<MT, 8, 8, 1, Epilogue, Norm>(args, Start::kAfterPrevious, stream)
                          : launch_skinny_shape<MT, 4, 8, 2, Epilogue, Norm>(args, Start::kAfterPrevious, stream);
    if constexpr (MT == 1) {
        if (args.m > 8 && args.n >= 4096 && args.n % 64 == 0)
            return launch_skinny_shape<MT, 8, 8, 2, Epilogue, Norm>(args, Start::kEarly, stream);
        if (args.m > 8 && args.n % 32 == 0) return launch_skinny_shape<MT, 4, 16, 4, Epilogue, Norm>(args, Start::kEarly, stream);
    }
    if (args.n >= 6144 && args.n % 24 == 0) return launch_skinny_shape<MT, 3, 8, 4, Epilogue, Norm>(args, Start::kEarly, stream);
    if (args.n >= 4096 && args.n % 16 == 0) return launch_skinny_shape<MT, 2, 8, 4, Epilogue, Norm>(args, Start::kEarly, stream);
    return launch_skinny_shape<MT, 1, 16, 8, Epilogue, Norm>(args, Start::kEarly, stream);
}

// Splits of k for `tiles` output tiles: one block per SM, at most a portable cluster (8) per
// tile and at least kMinSplitKTiles k steps per split. One block per SM, though two fit: a
// decode step of 32+ rows runs its layers as concurrent chains (src/gpu/forward.rs), and a
// product that leaves each SM's second slot to the other chain's attention gained more (batch
// 128 / 256 at context 512: 34,445 -> 36,672 / 42,763 -> 44,452 tok/s, H200) than it lost
// alone (batch 64, one chain: 26,794 -> 26,458).
int split_count(int tiles, int k_tiles, int sms) {
    return tiles >= sms ? 1 : std::max(1, std::min({sms / tiles, kMaxSplits, k_tiles / kMinSplitKTiles}));
}

// Launches `kernel` (BM-row tiles, `smem` bytes per block) over the tiles of args, k split to fill the SMs.
template <int BM>
cudaError_t launch_tiles(void (*kernel)(TiledArgs), size_t smem, const TiledArgs &args, cudaStream_t stream) {
    int sms = 0;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e == cudaSuccess) e = bi::multiprocessors(sms);
    if (e != cudaSuccess) return e;
    const int tiles_n = (args.n + kTileN - 1) / kTileN, tiles_m = (args.m + BM - 1) / BM;
    const int splits = split_count(tiles_n * tiles_m, args.k / kTiledK, sms);
    int l2 = 0;
    if (const cudaError_t e = bi::l2_bytes(l2); e != cudaSuccess) return e;
    TiledArgs ordered = args;
    const size_t weight_bytes = static_cast<size_t>(args.n) * args.k * (args.w.scales != nullptr ? 1 : 2);  // INT8 or bf16
    ordered.rows_along_x = weight_bytes > static_cast<size_t>(l2);
    const dim3 grid = ordered.rows_along_x ? dim3(tiles_m, tiles_n, splits) : dim3(tiles_n, tiles_m, splits);
    if (grid.y > 65535) return cudaErrorInvalidConfiguration;
    return bi::launch_clustered(kernel, grid, dim3(kTiledThreads), smem, stream, dim3(1, 1, splits), ordered);
}

// On a Hopper GPU (what sm_90a code runs on) wgmma; otherwise mma.sync.
template <int Epilogue, typename W, int BM>
cudaError_t launch_tiled_shape(const TiledArgs &args, cudaStream_t stream) {
    bool hopper = false;
    if (const cudaError_t e = bi::is_hopper(hopper); e != cudaSuccess) return e;
    if (hopper) return launch_tiles<BM>(wgmma_kernel<Epilogue, W, BM>, WgmmaTile<W, BM>::kSmem, args, stream);
    return launch_tiles<BM>(tiled_kernel<Epilogue, W, BM>, Tile<W, BM>::kSmem, args, stream);
}

// Tiles of 64 rows up to m = 64, else 128; always 128 columns, the SMs filled by splitting k
// (64-column tiles, which needed fewer splits, re-read the activations twice as often: the
// sweep at batch 128 / 256 went from 27,790 / 32,708 to 29,878 / 36,428 tok/s with 128, H200).
template <int Epilogue>
cudaError_t launch_tiled(const TiledArgs &args, cudaStream_t stream) {
    if (args.k % kTiledK != 0) return cudaErrorInvalidValue;
    return bi::with_weight_type(args.w, [&](auto type) {
        using W = decltype(type);
        return args.m <= 64 ? launch_tiled_shape<Epilogue, W, 64>(args, stream)
                            : launch_tiled_shape<Epilogue, W, 128>(args, stream);
    });
}

// m <= BI_SKINNY_ROWS, and the layer products up to twice that when alone: skinny (norm fused);
// larger m, those beside another chain (bi_placement) and the LM head above BI_SKINNY_ROWS:
// RMSNorm into `scratch`, then the tiled product (at m = 32 the skinny LM head took 286 us,
// tiled 110 us; the layer products the other way round, 32 against 42 us per layer: H200,
// benches/kernels.rs).
template <int Epilogue, bool Norm>
cudaError_t launch_linear(const SkinnyArgs &args, bi_placement placement, bi_bf16 *scratch, cudaStream_t stream) {
    if (args.m <= BI_SKINNY_ROWS) return launch_skinny<1, Epilogue, Norm>(args, stream);
    if (args.m <= 2 * BI_SKINNY_ROWS && args.n <= kSkinnyWidest && placement == BI_PLACEMENT_ALONE)
        return launch_skinny<2, Epilogue, Norm>(args, stream);
    const bi_bf16 *a = static_cast<const bi_bf16 *>(args.a);
    if constexpr (Norm) {
        const cudaError_t e = bi_rmsnorm(scratch, static_cast<const float *>(args.a), args.norm, args.m, args.k, args.eps, stream);
        if (e != cudaSuccess) return e;
        a = scratch;
    }
    return launch_tiled<Epilogue>(TiledArgs{args.out, a, args.w, args.m, args.n, args.k}, stream);
}

template <bool Norm>
cudaError_t dispatch(const SkinnyArgs &args, bi_epilogue epilogue, bi_placement placement, bi_bf16 *scratch,
                     cudaStream_t stream) {
    if (args.m <= 0 || args.n <= 0 || args.k <= 0 || args.n % 16 != 0) return cudaErrorInvalidValue;
    if (placement != BI_PLACEMENT_ALONE && placement != BI_PLACEMENT_BESIDE_CHAIN) return cudaErrorInvalidValue;
    switch (epilogue) {
        case BI_EPILOGUE_STORE_F32: return launch_linear<BI_EPILOGUE_STORE_F32, Norm>(args, placement, scratch, stream);
        case BI_EPILOGUE_ADD_RESIDUAL: return launch_linear<BI_EPILOGUE_ADD_RESIDUAL, Norm>(args, placement, scratch, stream);
        case BI_EPILOGUE_SWIGLU: return launch_linear<BI_EPILOGUE_SWIGLU, Norm>(args, placement, scratch, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace

extern "C" cudaError_t bi_linear(void *out, const bi_bf16 *a, bi_matrix w, int m, int n, int k,
                                 bi_epilogue epilogue, bi_placement placement, cudaStream_t stream) {
    return dispatch<false>(SkinnyArgs{out, a, nullptr, w, m, n, k, 0.0f}, epilogue, placement, nullptr, stream);
}

extern "C" cudaError_t bi_norm_linear(void *out, const float *x, const bi_bf16 *norm, float eps, bi_matrix w,
                                      bi_bf16 *scratch, int m, int n, int k, bi_epilogue epilogue,
                                      bi_placement placement, cudaStream_t stream) {
    return dispatch<true>(SkinnyArgs{out, x, norm, w, m, n, k, eps}, epilogue, placement, scratch, stream);
}
