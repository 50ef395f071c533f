// One transformer layer of a decode step in one launch (up to 16 rows, one per sequence).
//
// A persistent grid, one 16-warp block per SM, runs the layer's five phases with a grid-wide
// barrier between dependent ones:
//   qkv = rmsnorm(x) . Wqkv^T | q/k norm + RoPE, K/V into the cache, attention | x += attn . Wo^T
//   | act = SwiGLU(rmsnorm(x) . Wgu^T) | x += act . Wdown^T
// Weights never depend on activations: every block loads its rows of the next product into
// registers before it waits at the barrier, so DRAM streams while the grid synchronizes, and
// at the start it pulls the layer's later matrices and the next layer's qkv into L2 (bulk
// prefetch). Between layers, programmatic dependent launch hides the next launch's latency (its
// blocks cannot start early: 512 threads of 128 registers fill an SM).
//
// Measured on an H200 (benches/decode.rs, batch 1, context 1024, 2026-11-22):
//   the step as separate kernels (6 per layer, 172 graph nodes, PDL)            888 tok/s
//   this kernel, barrier = count + generation words                              878
//   this kernel, barrier = one atomic on a growing 64-bit counter (shipped)      940
//   timing-only builds of the two-word-barrier version: no barriers (wrong results) 1,152; no
//   attention phase 1,186. Barriers (~0.26 ms/step) and the attention phase's chain of dependent memory
//   round trips (~0.21 ms/step) are what stands between this kernel and the bandwidth.
//   Tried and reverted: all 28 layers in one launch (5 graph nodes): 860, register spills and
//   a grid barrier costs more than a PDL kernel boundary; gate/up tiles staged in shared
//   memory by cp.async from the kernel's start: 923, they slow the qkv phase on the critical
//   path; L2 prefetch of the next kernel's weights in the separate-kernel path: no change.
#include "attention.cuh"
#include "matvec.cuh"

namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * bi::kWarp;
constexpr int kMaxRows = 16;  // one m16 tile of the tensor-core product
static_assert(bi::attn::kWarps == kWarps, "the attention core runs on the same 16 warps");

// This block's weight tiles of one [n, k] product, in registers: tile i is rows
// (blockIdx.x + i * gridDim.x) * 8 .. + 8; warp w holds k columns [w * k / 16, (w + 1) * k / 16).
template <int Chunks, int MaxTiles>
struct Tiles {
    uint4 w[MaxTiles][Chunks];
};

template <int Chunks, int MaxTiles>
__device__ __forceinline__ void load_tiles(Tiles<Chunks, MaxTiles> &t, const bi_bf16 *w, int n, int k) {
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp, g = lane / 4, q = lane % 4;
#pragma unroll
    for (int i = 0; i < MaxTiles; ++i) {
        const int tile = blockIdx.x + i * gridDim.x;
        const bi_bf16 *row = w + static_cast<size_t>(tile * 8 + g) * k + warp * (k / kWarps) + 8 * q;
#pragma unroll
        for (int c = 0; c < Chunks; ++c)
            t.w[i][c] = tile * 8 < n ? bi::load_stream(row + c * bi::kChunk) : make_uint4(0, 0, 0, 0);
    }
}

// out = act . W^T for this block's tiles, then the epilogue. smem: 16 + MaxTiles * 16 * 128 floats.
template <int Chunks, int MaxTiles, int Epilogue, bool Norm>
__device__ __forceinline__ void product(const Tiles<Chunks, MaxTiles> &t, const bi::Activations &act, float eps, void *out,
                                        int n, float *smem) {
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp, g = lane / 4, q = lane % 4;
    float *inv_rms = smem, *reduce = smem + kMaxRows;  // reduce: [MaxTiles][kWarps][4][32]
    if constexpr (Norm) {
        bi::row_inv_rms(act, eps, inv_rms);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < MaxTiles; ++i) {
        if ((blockIdx.x + i * gridDim.x) * 8 >= n) break;
        float acc[4] = {};
#pragma unroll
        for (int c = 0; c < Chunks; ++c) {
            const int col = warp * (act.k / kWarps) + 8 * q + c * bi::kChunk;
            const uint4 lo = bi::a_chunk<Norm>(act, g, col, inv_rms), hi = bi::a_chunk<Norm>(act, g + 8, col, inv_rms);
            bi::mma_bf16(acc, lo.x, hi.x, lo.y, hi.y, t.w[i][c].x, t.w[i][c].y);
            bi::mma_bf16(acc, lo.z, hi.z, lo.w, hi.w, t.w[i][c].z, t.w[i][c].w);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) reduce[((i * kWarps + warp) * 4 + e) * bi::kWarp + lane] = acc[e];
    }
    __syncthreads();
    const int tile = blockIdx.x + warp * gridDim.x;  // warp i sums tile i over the warps
    if (warp < MaxTiles && tile * 8 < n) {
        float v[4] = {};
        for (int w = 0; w < kWarps; ++w)
#pragma unroll
            for (int e = 0; e < 4; ++e) v[e] += reduce[((warp * kWarps + w) * 4 + e) * bi::kWarp + lane];
        const int col = tile * 8 + 2 * q;
        if (g < act.m) bi::store_pair<Epilogue>(out, n, g, col, v[0], v[1]);
        if (g + 8 < act.m) bi::store_pair<Epilogue>(out, n, g + 8, col, v[2], v[3]);
    }
    __syncthreads();  // shared memory is reused by the next phase
}

// All blocks of the grid meet here. `arrivals` only grows (64 bits: it never wraps), so a
// barrier is one atomic add and a poll, with nothing to reset between barriers or launches.
__device__ __forceinline__ void grid_barrier(unsigned long long *arrivals) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned long long ticket = atomicAdd(arrivals, 1ull);
        const unsigned long long release = (ticket / gridDim.x + 1) * gridDim.x;
        while (*reinterpret_cast<volatile unsigned long long *>(arrivals) < release) {
        }
        __threadfence();
    }
    __syncthreads();
}

// Qwen3's per-head RMSNorm and rotate-half RoPE of one 128-wide head, by a warp: lane l gets
// dims 4l..4l+3 (their rotation partners 64 dims away sit in lane l ^ 16).
__device__ __forceinline__ void norm_rope(float (&out)[4], const float *head, const bi_bf16 *norm, int pos,
                                          const float *inv_freq, float eps) {
    const int lane = threadIdx.x % bi::kWarp;
    const float4 x4 = *reinterpret_cast<const float4 *>(head + 4 * lane);
    const float x[4] = {x4.x, x4.y, x4.z, x4.w};
    const float inv_rms = rsqrtf(bi::warp_sum(x[0] * x[0] + x[1] * x[1] + x[2] * x[2] + x[3] * x[3]) / BI_HEAD_DIM + eps);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int d = 4 * lane + i;
        const float y = x[i] * inv_rms * bi::bf16_to_f32(norm[d]);
        const float partner = __shfl_xor_sync(0xffffffffu, y, 16);
        float s, c;
        sincosf(static_cast<float>(pos) * inv_freq[d % (BI_HEAD_DIM / 2)], &s, &c);
        out[i] = lane < 16 ? y * c - partner * s : y * c + partner * s;
    }
}

__device__ __forceinline__ void store_bf16x4(bi_bf16 *dst, const float (&v)[4]) {
    *reinterpret_cast<uint2 *>(dst) = make_uint2(bi::pack_bf16x2(v[0], v[1]), bi::pack_bf16x2(v[2], v[3]));
}

// Work items (row, kv head, range): q/k norm + RoPE, the new K/V into the cache, attention.
__device__ void attention_phase(const bi_layer_weights &w, const bi_layer_state &st, float *smem) {
    using namespace bi::attn;
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp;
    const Args args{st.attn, st.partials, st.counters, w.k_cache, w.v_cache};
    const int items = st.m * BI_KV_HEADS * st.splits;
    for (int item = blockIdx.x; item < items; item += gridDim.x) {
        const int row = item / (BI_KV_HEADS * st.splits), kv_head = item / st.splits % BI_KV_HEADS, split = item % st.splits;
        const int pos = st.positions[row];
        if (pos < 0) {  // padding row: zeros
            if (split == 0)
                for (int i = threadIdx.x; i < kGroup * BI_HEAD_DIM; i += blockDim.x)
                    st.attn[(static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup) * BI_HEAD_DIM + i] = 0;
            continue;
        }
        const int active = min(st.splits, (pos + kMinSplitTokens) / kMinSplitTokens);
        if (split >= active) continue;  // a short context uses fewer ranges
        const int32_t *table = st.block_tables + static_cast<size_t>(st.row_seq[row]) * st.max_blocks;
        const float *qkv = st.qkv + static_cast<size_t>(row) * (BI_Q_HEADS + 2 * BI_KV_HEADS) * BI_HEAD_DIM;
        // The range that ends at `pos` first writes the new K and V, then reads them back.
        if (split == active - 1) {
            const size_t slot = ((static_cast<size_t>(table[pos / BI_BLOCK_TOKENS]) * BI_KV_HEADS + kv_head) * BI_BLOCK_TOKENS +
                                 pos % BI_BLOCK_TOKENS) * BI_HEAD_DIM + 4 * lane;
            if (warp == 0) {
                float k[4];
                norm_rope(k, qkv + (BI_Q_HEADS + kv_head) * BI_HEAD_DIM, w.k_norm, pos, st.rope_inv_freq, st.eps);
                store_bf16x4(w.k_cache + slot, k);
            } else if (warp == 1) {
                const float4 v4 = *reinterpret_cast<const float4 *>(qkv + (BI_Q_HEADS + BI_KV_HEADS + kv_head) * BI_HEAD_DIM + 4 * lane);
                const float v[4] = {v4.x, v4.y, v4.z, v4.w};
                store_bf16x4(w.v_cache + slot, v);
            }
            __syncthreads();
        }
        // Every warp needs both query heads: each computes them (2 KiB from L2), rounded to bf16
        // as the separate kernels store them.
        float qh[kGroup][kDims];
        const float scale = rsqrtf(static_cast<float>(BI_HEAD_DIM)) * kLog2e;
#pragma unroll
        for (int h = 0; h < kGroup; ++h) {
            norm_rope(qh[h], qkv + (kv_head * kGroup + h) * BI_HEAD_DIM, w.q_norm, pos, st.rope_inv_freq, st.eps);
#pragma unroll
            for (int d = 0; d < kDims; ++d) qh[h][d] = bi::bf16_to_f32(bi::f32_to_bf16(qh[h][d])) * scale;
        }
        attend_split(args, row, kv_head, split, st.splits, pos, table, qh, smem);
        __syncthreads();  // shared memory is reused by the next item
    }
}

constexpr int kQkvRows = (BI_Q_HEADS + 2 * BI_KV_HEADS) * BI_HEAD_DIM;
constexpr int kQWidth = BI_Q_HEADS * BI_HEAD_DIM;
// Most tiles per block of each product (qkv 512 tiles, gate/up 768, o and down 128): enough
// for grids of 110 blocks and up (132 SMs on H100/H200 SXM, 114 on H100 PCIe); smaller GPUs
// take the separate kernels.
constexpr int kQkvTiles = 5, kGateUpTiles = 7, kNarrowTiles = 2;
static_assert(BI_FUSED_DECODE_MIN_SMS * kQkvTiles * 8 >= kQkvRows && BI_FUSED_DECODE_MIN_SMS * kNarrowTiles * 8 >= BI_HIDDEN &&
                  BI_FUSED_DECODE_MIN_SMS * kGateUpTiles * 8 >= 2 * BI_INTERMEDIATE,
              "every block must own at most the tiles its registers hold");
constexpr int kSmemFloats = kMaxRows + kGateUpTiles * kWarps * 4 * bi::kWarp > bi::attn::kSmemFloats
                                ? kMaxRows + kGateUpTiles * kWarps * 4 * bi::kWarp
                                : bi::attn::kSmemFloats;

__global__ void __launch_bounds__(kThreads, 1) layer_kernel(bi_layer_weights w, bi_layer_state st) {
    extern __shared__ float smem[];
    bi::allow_next_kernel();
    bi::prefetch_l2_share(w.o, static_cast<size_t>(BI_HIDDEN) * kQWidth * sizeof(bi_bf16));
    bi::prefetch_l2_share(w.gate_up, static_cast<size_t>(2 * BI_INTERMEDIATE) * BI_HIDDEN * sizeof(bi_bf16));
    bi::prefetch_l2_share(w.down, static_cast<size_t>(BI_HIDDEN) * BI_INTERMEDIATE * sizeof(bi_bf16));
    bi::prefetch_l2_share(w.next_qkv, w.next_qkv_bytes);

    Tiles<BI_HIDDEN / kWarps / bi::kChunk, kQkvTiles> qkv_w;
    load_tiles(qkv_w, w.qkv, kQkvRows, BI_HIDDEN);
    bi::wait_for_previous_kernel();
    product<BI_HIDDEN / kWarps / bi::kChunk, kQkvTiles, BI_EPILOGUE_STORE_F32, true>(
        qkv_w, {st.x, w.input_norm, st.m, BI_HIDDEN}, st.eps, st.qkv, kQkvRows, smem);

    Tiles<kQWidth / kWarps / bi::kChunk, kNarrowTiles> o_w;
    load_tiles(o_w, w.o, BI_HIDDEN, kQWidth);
    grid_barrier(st.arrivals);
    attention_phase(w, st, smem);
    grid_barrier(st.arrivals);
    product<kQWidth / kWarps / bi::kChunk, kNarrowTiles, BI_EPILOGUE_ADD_RESIDUAL, false>(
        o_w, {st.attn, nullptr, st.m, kQWidth}, st.eps, st.x, BI_HIDDEN, smem);

    Tiles<BI_HIDDEN / kWarps / bi::kChunk, kGateUpTiles> gate_up_w;
    load_tiles(gate_up_w, w.gate_up, 2 * BI_INTERMEDIATE, BI_HIDDEN);
    grid_barrier(st.arrivals);
    product<BI_HIDDEN / kWarps / bi::kChunk, kGateUpTiles, BI_EPILOGUE_SWIGLU, true>(
        gate_up_w, {st.x, w.post_norm, st.m, BI_HIDDEN}, st.eps, st.act, 2 * BI_INTERMEDIATE, smem);

    Tiles<BI_INTERMEDIATE / kWarps / bi::kChunk, kNarrowTiles> down_w;
    load_tiles(down_w, w.down, BI_HIDDEN, BI_INTERMEDIATE);
    grid_barrier(st.arrivals);
    product<BI_INTERMEDIATE / kWarps / bi::kChunk, kNarrowTiles, BI_EPILOGUE_ADD_RESIDUAL, false>(
        down_w, {st.act, nullptr, st.m, BI_INTERMEDIATE}, st.eps, st.x, BI_HIDDEN, smem);
}

}  // namespace

extern "C" cudaError_t bi_decode_layer(const bi_layer_weights *weights, const bi_layer_state *state, cudaStream_t stream) {
    if (weights == nullptr || state == nullptr || state->m <= 0 || state->m > kMaxRows || state->splits <= 0 ||
        state->splits > BI_MAX_SPLITS || state->max_blocks <= 0)
        return cudaErrorInvalidValue;
    int device = 0, sms = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (e != cudaSuccess) return e;
    if (sms < BI_FUSED_DECODE_MIN_SMS) return cudaErrorInvalidConfiguration;
    constexpr size_t smem = kSmemFloats * sizeof(float);
    e = cudaFuncSetAttribute(layer_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
    return bi::launch(layer_kernel, dim3(sms), dim3(kThreads), smem, stream, *weights, *state);
}
