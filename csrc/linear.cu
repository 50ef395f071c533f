// Linear layers on tensor cores: out = a[m, k] . w[n, k]^T with f32 accumulation
// (mma.sync m16n8k16 bf16), and a fused epilogue (store, residual add, or SwiGLU). Weights are
// bf16, or INT8 converted to bf16 fragments in registers with the row scale applied to the sum.
//
// Two tilings of the same product, picked by m:
// - skinny (m <= 64, decode): weights stream straight from global memory into mma fragments
//   with 16-byte loads; each block owns 8*TN weight rows and its warps split k. The k axis is
//   permuted inside every 32-column chunk (same permutation for a and w, so the dot product is
//   unchanged): a thread's 8 contiguous bf16 feed two k16 steps. At m = 1 the tensor core
//   wastes 15/16 of its rows, which costs nothing in a memory-bound product.
// - tiled (m > 64, prefill): 128x128x32 block tiles through a 3-stage cp.async pipeline and
//   ldmatrix, 8 warps of 64x32.
#include "matvec.cuh"

namespace {

using bi::kChunk;
using bi::mma_bf16;
using bi::store_pair;

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

// Unroll: 32-column chunks of bf16 weights whose loads a thread has in flight at once (twice as
// many chunks of INT8 weights: the same bytes).
template <int MT, int TN, int Warps, int Unroll, int Epilogue, bool Norm, typename W>
__global__ void __launch_bounds__(Warps * bi::kWarp) skinny_kernel(SkinnyArgs args) {
    using Chunk = bi::WeightChunk<W>;
    constexpr int kLoads = Unroll * sizeof(bi_bf16) / sizeof(W);
    static_assert(Warps * MT * TN <= 64, "the cross-warp reduction must fit 32 KiB of shared memory");
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp;
    const int g = lane / 4, q = lane % 4;  // mma fragment coordinates
    const int n0 = blockIdx.x * 8 * TN;
    const int k_warp = args.k / Warps;
    const int k_begin = warp * k_warp + 8 * q;

    bi::allow_next_kernel();
    __shared__ float inv_rms[MT * 16];
    float acc[MT][TN][4] = {};
    const W *w_rows[TN];
#pragma unroll
    for (int t = 0; t < TN; ++t)
        w_rows[t] = static_cast<const W *>(args.w.values) + static_cast<size_t>(n0 + t * 8 + g) * args.k + k_begin;

    for (int c0 = 0; c0 < k_warp; c0 += kChunk * kLoads) {
        typename Chunk::Raw wv[kLoads][TN];
#pragma unroll
        for (int u = 0; u < kLoads; ++u)
#pragma unroll
            for (int t = 0; t < TN; ++t)
                wv[u][t] = c0 + u * kChunk < k_warp ? Chunk::stream(w_rows[t] + c0 + u * kChunk) : typename Chunk::Raw{};
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
        for (int u = 0; u < kLoads; ++u) {
            if (c0 + u * kChunk >= k_warp) break;
            const int col = k_begin + c0 + u * kChunk;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const uint4 lo = bi::a_chunk<Norm>(args.activations(), mt * 16 + g, col, inv_rms);
                const uint4 hi = bi::a_chunk<Norm>(args.activations(), mt * 16 + g + 8, col, inv_rms);
#pragma unroll
                for (int t = 0; t < TN; ++t) {
                    const uint4 b = Chunk::bf16(wv[u][t]);
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
// Tiled: 128x128 output tiles, k in steps of 32, 3 shared-memory stages. bf16 weight fragments
// come from ldmatrix; INT8 ones are read two bytes at a time and converted.

constexpr int kTileM = 128, kTileN = 128, kTileK = 32, kStages = 3;
constexpr int kTiledThreads = 256;
constexpr int kRowPitch = kTileK + 8;  // bf16 per smem row: 80 bytes, conflict-free ldmatrix
static_assert((kRowPitch * 2) % 16 == 0, "smem rows must stay 16-byte aligned for cp.async");
// Bytes per staged weight row: bf16 rows as the A rows; INT8 rows 48 bytes, so the 8 rows of a
// fragment read fall in distinct banks.
template <typename W>
constexpr int w_pitch_bytes() { return sizeof(W) == 1 ? kTileK + 16 : kRowPitch * 2; }
template <typename W>
constexpr int stage_bytes() { return kTileM * kRowPitch * 2 + kTileN * w_pitch_bytes<W>(); }
template <typename W>
constexpr size_t tiled_smem() { return kStages * stage_bytes<W>(); }

__device__ __forceinline__ void cp_async16(void *smem, const void *global, bool valid) {
    const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    const int bytes = valid ? 16 : 0;  // 0: fill with zeros (rows past m)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global), "r"(bytes));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *smem) {
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

template <int Epilogue, typename W>
__global__ void __launch_bounds__(kTiledThreads)
    tiled_kernel(void *out, const bi_bf16 *__restrict__ a, bi_matrix matrix, int m, int n, int k) {
    extern __shared__ __align__(16) unsigned char smem[];
    const W *__restrict__ w = static_cast<const W *>(matrix.values);
    constexpr int kWPitch = w_pitch_bytes<W>(), kWChunks = kTileK * sizeof(W) / 16;  // 16-byte chunks per row
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp;
    const int wm = warp / 4, wn = warp % 4;  // warp tile: rows wm*64.., cols wn*32..
    const int m0 = blockIdx.y * kTileM, n0 = blockIdx.x * kTileN;
    const int k_tiles = k / kTileK;
    bi::allow_next_kernel();
    bi::wait_for_previous_kernel();

    auto stage_a = [&](int stage) { return reinterpret_cast<bi_bf16 *>(smem + stage * stage_bytes<W>()); };
    auto stage_w = [&](int stage) { return smem + stage * stage_bytes<W>() + kTileM * kRowPitch * 2; };
    auto load_stage = [&](int stage, int kt) {
        bi_bf16 *sa = stage_a(stage);
        unsigned char *sw = stage_w(stage);
#pragma unroll
        for (int i = 0; i < 2; ++i) {  // 128 rows x 4 chunks of 16 bytes
            const int chunk = threadIdx.x + i * kTiledThreads, row = chunk / 4, c = (chunk % 4) * 8;
            const int a_row = min(m0 + row, m - 1);
            cp_async16(sa + row * kRowPitch + c, a + static_cast<size_t>(a_row) * k + kt * kTileK + c, m0 + row < m);
        }
#pragma unroll
        for (int i = 0; i < kWChunks * kTileN / kTiledThreads; ++i) {
            const int chunk = threadIdx.x + i * kTiledThreads, row = chunk / kWChunks, c = chunk % kWChunks;
            cp_async16(sw + row * kWPitch + 16 * c, w + static_cast<size_t>(n0 + row) * k + kt * kTileK + c * 16 / sizeof(W), true);
        }
    };

    float acc[4][4][4] = {};
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < k_tiles) load_stage(s, s);
        asm volatile("cp.async.commit_group;\n");
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 2));
        __syncthreads();
        const int next = kt + kStages - 1;
        if (next < k_tiles) load_stage(next % kStages, next);
        asm volatile("cp.async.commit_group;\n");

        const bi_bf16 *sa = stage_a(kt % kStages);
        const unsigned char *sw = stage_w(kt % kStages);
#pragma unroll
        for (int ks = 0; ks < kTileK; ks += 16) {
            uint32_t af[4][4], bf[4][2];  // bf[nt]: the two B registers of n8 tile nt
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
                ldmatrix_x4(af[mt], sa + (wm * 64 + mt * 16 + lane % 16) * kRowPitch + ks + (lane / 16) * 8);
            if constexpr (sizeof(W) == 2) {
#pragma unroll
                for (int np = 0; np < 2; ++np) {  // two n8 tiles per ldmatrix.x4
                    uint32_t r[4];
                    ldmatrix_x4(r, reinterpret_cast<const bi_bf16 *>(sw) +
                                       (wn * 32 + np * 16 + lane % 8 + (lane / 16) * 8) * kRowPitch + ks + ((lane / 8) % 2) * 8);
                    bf[2 * np][0] = r[0], bf[2 * np][1] = r[1], bf[2 * np + 1][0] = r[2], bf[2 * np + 1][1] = r[3];
                }
            } else {
                const int g = lane / 4, q = lane % 4;  // B fragment: row g, k 2q, 2q + 1 and 2q + 8, 2q + 9
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    const unsigned char *row = sw + (wn * 32 + nt * 8 + g) * kWPitch + ks + 2 * q;
                    bf[nt][0] = bi::int8x2_to_bf16x2(*reinterpret_cast<const uint16_t *>(row));
                    bf[nt][1] = bi::int8x2_to_bf16x2(*reinterpret_cast<const uint16_t *>(row + 8));
                }
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt)
                    mma_bf16(acc[mt][nt], af[mt][0], af[mt][1], af[mt][2], af[mt][3], bf[nt][0], bf[nt][1]);
        }
    }
    asm volatile("cp.async.wait_group 0;\n");

    const int g = lane / 4, q = lane % 4;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int row = m0 + wm * 64 + mt * 16 + g, col = n0 + wn * 32 + nt * 8 + 2 * q;
            const float2 s = bi::column_scales<W>(matrix.scales, col);
            if (row < m) store_pair<Epilogue>(out, n, row, col, acc[mt][nt][0] * s.x, acc[mt][nt][1] * s.y);
            if (row + 8 < m) store_pair<Epilogue>(out, n, row + 8, col, acc[mt][nt][2] * s.x, acc[mt][nt][3] * s.y);
        }
}

// ---------------------------------------------------------------------------------------------

// Warps per block: `base`, halved until the cross-warp reduction fits its shared memory.
constexpr int fitted_warps(int base, int mt, int tn) { return base * mt * tn <= 64 ? base : fitted_warps(base / 2, mt, tn); }

template <int MT, int TN, int BaseWarps, int Unroll, int Epilogue, bool Norm>
cudaError_t launch_skinny_shape(const SkinnyArgs &args, cudaStream_t stream) {
    constexpr int warps = fitted_warps(BaseWarps, MT, TN);
    if (args.k % (warps * kChunk) != 0 || args.n % (8 * TN) != 0) return cudaErrorInvalidValue;
    return bi::with_weight_type(args.w, [&](auto type) {
        return bi::launch(skinny_kernel<MT, TN, warps, Unroll, Epilogue, Norm, decltype(type)>, dim3(args.n / (8 * TN)),
                          dim3(warps * bi::kWarp), 0, stream, args);
    });
}

// Shapes picked so that each product is about one wave of two blocks per SM (132 SMs) with
// every warp holding 4-8 weight loads in flight: the LM head's 151936 rows in 16-row blocks of
// 4 warps; gate/up (6144) in 24-row blocks and qkv (4096) in 16-row blocks of 8 warps; the
// 1024-row products in 8-row blocks of 16 warps splitting k.
template <int MT, int Epilogue, bool Norm>
cudaError_t launch_skinny(const SkinnyArgs &args, cudaStream_t stream) {
    if (args.n > 8192) return launch_skinny_shape<MT, 2, 4, 8, Epilogue, Norm>(args, stream);
    if (args.n >= 6144 && args.n % 24 == 0) return launch_skinny_shape<MT, 3, 8, 4, Epilogue, Norm>(args, stream);
    if (args.n >= 4096 && args.n % 16 == 0) return launch_skinny_shape<MT, 2, 8, 4, Epilogue, Norm>(args, stream);
    return launch_skinny_shape<MT, 1, 16, 8, Epilogue, Norm>(args, stream);
}

template <int Epilogue>
cudaError_t launch_tiled(void *out, const bi_bf16 *a, bi_matrix w, int m, int n, int k, cudaStream_t stream) {
    if (n % kTileN != 0 || k % kTileK != 0) return cudaErrorInvalidValue;
    return bi::with_weight_type(w, [&](auto type) {
        using W = decltype(type);
        constexpr size_t smem = tiled_smem<W>();
        const cudaError_t e =
            cudaFuncSetAttribute(tiled_kernel<Epilogue, W>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
        if (e != cudaSuccess) return e;
        const dim3 grid(n / kTileN, (m + kTileM - 1) / kTileM);
        return bi::launch(tiled_kernel<Epilogue, W>, grid, dim3(kTiledThreads), smem, stream, out, a, w, m, n, k);
    });
}

// m <= 64: skinny (norm fused); larger m: RMSNorm into `scratch`, then the tiled product.
template <int Epilogue, bool Norm>
cudaError_t launch_linear(const SkinnyArgs &args, bi_bf16 *scratch, cudaStream_t stream) {
    if (args.m <= 16) return launch_skinny<1, Epilogue, Norm>(args, stream);
    if (args.m <= 32) return launch_skinny<2, Epilogue, Norm>(args, stream);
    if (args.m <= 64) return launch_skinny<4, Epilogue, Norm>(args, stream);
    const bi_bf16 *a = static_cast<const bi_bf16 *>(args.a);
    if constexpr (Norm) {
        const cudaError_t e = bi_rmsnorm(scratch, static_cast<const float *>(args.a), args.norm, args.m, args.k, args.eps, stream);
        if (e != cudaSuccess) return e;
        a = scratch;
    }
    return launch_tiled<Epilogue>(args.out, a, args.w, args.m, args.n, args.k, stream);
}

template <bool Norm>
cudaError_t dispatch(const SkinnyArgs &args, bi_epilogue epilogue, bi_bf16 *scratch, cudaStream_t stream) {
    if (args.m <= 0 || args.n <= 0 || args.k <= 0 || args.n % 16 != 0) return cudaErrorInvalidValue;
    switch (epilogue) {
        case BI_EPILOGUE_STORE_F32: return launch_linear<BI_EPILOGUE_STORE_F32, Norm>(args, scratch, stream);
        case BI_EPILOGUE_ADD_RESIDUAL: return launch_linear<BI_EPILOGUE_ADD_RESIDUAL, Norm>(args, scratch, stream);
        case BI_EPILOGUE_SWIGLU: return launch_linear<BI_EPILOGUE_SWIGLU, Norm>(args, scratch, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace

extern "C" cudaError_t bi_linear(void *out, const bi_bf16 *a, bi_matrix w, int m, int n, int k,
                                 bi_epilogue epilogue, cudaStream_t stream) {
    return dispatch<false>(SkinnyArgs{out, a, nullptr, w, m, n, k, 0.0f}, epilogue, nullptr, stream);
}

extern "C" cudaError_t bi_norm_linear(void *out, const float *x, const bi_bf16 *norm, float eps, bi_matrix w,
                                      bi_bf16 *scratch, int m, int n, int k, bi_epilogue epilogue,
                                      cudaStream_t stream) {
    return dispatch<true>(SkinnyArgs{out, x, norm, w, m, n, k, eps}, epilogue, scratch, stream);
}
