// Linear layers on tensor cores: out = a[m, k] . w[n, k]^T with f32 accumulation
// (mma.sync m16n8k16 bf16), and a fused epilogue (store, residual add, or SwiGLU).
//
// Two tilings of the same product, picked by m:
// - skinny (m <= 64, decode): weights stream straight from global memory into mma fragments
//   with 16-byte loads; each block owns 8*TN weight rows and its 4 warps split k. The k axis is
//   permuted inside every 32-column chunk (same permutation for a and w, so the dot product is
//   unchanged): a thread's 8 contiguous bf16 feed two k16 steps. At m = 1 the tensor core
//   wastes 15/16 of its rows, which costs nothing in a memory-bound product.
// - tiled (m > 64, prefill): 128x128x32 block tiles through a 3-stage cp.async pipeline and
//   ldmatrix, 8 warps of 64x32.
#include "common.cuh"

namespace {

constexpr int kChunk = 32;  // k columns per skinny step: one 16-byte load per thread per row

// ---------------------------------------------------------------------------------------------
// Epilogue: every thread ends with pairs of adjacent output columns (col even), so SwiGLU finds
// gate and up side by side when the weight rows interleave them (row 2i gate_i, 2i+1 up_i).

template <int Epilogue>
__device__ __forceinline__ void store_pair(void *out, int n, int row, int col, float v0, float v1) {
    if constexpr (Epilogue == BI_EPILOGUE_STORE_F32) {
        *reinterpret_cast<float2 *>(static_cast<float *>(out) + static_cast<size_t>(row) * n + col) =
            make_float2(v0, v1);
    } else if constexpr (Epilogue == BI_EPILOGUE_ADD_RESIDUAL) {
        float2 *p = reinterpret_cast<float2 *>(static_cast<float *>(out) + static_cast<size_t>(row) * n + col);
        float2 x = *p;
        *p = make_float2(x.x + v0, x.y + v1);
    } else {
        static_assert(Epilogue == BI_EPILOGUE_SWIGLU, "unknown epilogue");
        const float silu = v0 / (1.0f + __expf(-v0));
        static_cast<bi_bf16 *>(out)[static_cast<size_t>(row) * (n / 2) + col / 2] = bi::f32_to_bf16(silu * v1);
    }
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Weights are read once per step: keep them out of L1.
__device__ __forceinline__ uint4 load_stream(const void *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// ---------------------------------------------------------------------------------------------
// Skinny: grid n / (8*TN) blocks of 4 warps; warp w covers k columns [w*k/4, (w+1)*k/4).

constexpr int kSkinnyWarps = 4;
constexpr int kSkinnyUnroll = 8;  // 32-column chunks whose weight loads are in flight at once

template <int MT, int TN, int Epilogue>
__global__ void __launch_bounds__(kSkinnyWarps * bi::kWarp)
    skinny_kernel(void *out, const bi_bf16 *__restrict__ a, const bi_bf16 *__restrict__ w, int m, int n, int k) {
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp;
    const int g = lane / 4, q = lane % 4;  // mma fragment coordinates
    const int n0 = blockIdx.x * 8 * TN;
    const int k_warp = k / kSkinnyWarps;
    const int k_begin = warp * k_warp + 8 * q;

    bi::allow_next_kernel();
    float acc[MT][TN][4] = {};
    const bi_bf16 *w_rows[TN];
#pragma unroll
    for (int t = 0; t < TN; ++t) w_rows[t] = w + static_cast<size_t>(n0 + t * 8 + g) * k + k_begin;

    for (int c0 = 0; c0 < k_warp; c0 += kChunk * kSkinnyUnroll) {
        uint4 wv[kSkinnyUnroll][TN];
#pragma unroll
        for (int u = 0; u < kSkinnyUnroll; ++u)
#pragma unroll
            for (int t = 0; t < TN; ++t)
                wv[u][t] = c0 + u * kChunk < k_warp ? load_stream(w_rows[t] + c0 + u * kChunk) : make_uint4(0, 0, 0, 0);
        // Weights never depend on the previous kernel: the first loads are in flight before
        // the wait for the activations it writes.
        if (c0 == 0) bi::wait_for_previous_kernel();
#pragma unroll
        for (int u = 0; u < kSkinnyUnroll; ++u) {
            if (c0 + u * kChunk >= k_warp) break;
            const int col = k_begin + c0 + u * kChunk;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int r_lo = mt * 16 + g, r_hi = r_lo + 8;
                const uint4 zero = make_uint4(0, 0, 0, 0);
                const uint4 lo = r_lo < m ? *reinterpret_cast<const uint4 *>(a + static_cast<size_t>(r_lo) * k + col) : zero;
                const uint4 hi = r_hi < m ? *reinterpret_cast<const uint4 *>(a + static_cast<size_t>(r_hi) * k + col) : zero;
#pragma unroll
                for (int t = 0; t < TN; ++t) {
                    mma_bf16(acc[mt][t], lo.x, hi.x, lo.y, hi.y, wv[u][t].x, wv[u][t].y);
                    mma_bf16(acc[mt][t], lo.z, hi.z, lo.w, hi.w, wv[u][t].z, wv[u][t].w);
                }
            }
        }
    }

    // Sum the 4 warps' partial products; warp 0 applies the epilogue.
    __shared__ float partial[kSkinnyWarps][MT * TN * 4][bi::kWarp];
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
                v[e] = partial[0][idx][lane] + partial[1][idx][lane] + partial[2][idx][lane] + partial[3][idx][lane];
            }
            const int row = mt * 16 + g, col = n0 + t * 8 + 2 * q;
            if (row < m) store_pair<Epilogue>(out, n, row, col, v[0], v[1]);
            if (row + 8 < m) store_pair<Epilogue>(out, n, row + 8, col, v[2], v[3]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tiled: 128x128 output tiles, k in steps of 32, 3 shared-memory stages.

constexpr int kTileM = 128, kTileN = 128, kTileK = 32, kStages = 3;
constexpr int kTiledThreads = 256;
constexpr int kRowPitch = kTileK + 8;  // bf16 per smem row: 80 bytes, conflict-free ldmatrix
static_assert((kRowPitch * 2) % 16 == 0, "smem rows must stay 16-byte aligned for cp.async");
constexpr int kStageElems = (kTileM + kTileN) * kRowPitch;
constexpr size_t kTiledSmem = kStages * kStageElems * sizeof(bi_bf16);

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

template <int Epilogue>
__global__ void __launch_bounds__(kTiledThreads)
    tiled_kernel(void *out, const bi_bf16 *__restrict__ a, const bi_bf16 *__restrict__ w, int m, int n, int k) {
    extern __shared__ __align__(16) bi_bf16 smem[];
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp;
    const int wm = warp / 4, wn = warp % 4;  // warp tile: rows wm*64.., cols wn*32..
    const int m0 = blockIdx.y * kTileM, n0 = blockIdx.x * kTileN;
    const int k_tiles = k / kTileK;
    bi::allow_next_kernel();
    bi::wait_for_previous_kernel();

    auto load_stage = [&](int stage, int kt) {
        bi_bf16 *sa = smem + stage * kStageElems, *sw = sa + kTileM * kRowPitch;
#pragma unroll
        for (int i = 0; i < 2; ++i) {  // 128 rows x 4 chunks of 16 bytes, per operand
            const int chunk = threadIdx.x + i * kTiledThreads, row = chunk / 4, c = (chunk % 4) * 8;
            const int a_row = min(m0 + row, m - 1);
            cp_async16(sa + row * kRowPitch + c, a + static_cast<size_t>(a_row) * k + kt * kTileK + c, m0 + row < m);
            cp_async16(sw + row * kRowPitch + c, w + static_cast<size_t>(n0 + row) * k + kt * kTileK + c, true);
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

        const bi_bf16 *sa = smem + (kt % kStages) * kStageElems, *sw = sa + kTileM * kRowPitch;
#pragma unroll
        for (int ks = 0; ks < kTileK; ks += 16) {
            uint32_t af[4][4], bf[2][4];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
                ldmatrix_x4(af[mt], sa + (wm * 64 + mt * 16 + lane % 16) * kRowPitch + ks + (lane / 16) * 8);
#pragma unroll
            for (int np = 0; np < 2; ++np)  // two n8 tiles per ldmatrix.x4
                ldmatrix_x4(bf[np], sw + (wn * 32 + np * 16 + lane % 8 + (lane / 16) * 8) * kRowPitch + ks + ((lane / 8) % 2) * 8);
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt)
                    mma_bf16(acc[mt][nt], af[mt][0], af[mt][1], af[mt][2], af[mt][3], bf[nt / 2][(nt % 2) * 2],
                             bf[nt / 2][(nt % 2) * 2 + 1]);
        }
    }
    asm volatile("cp.async.wait_group 0;\n");

    const int g = lane / 4, q = lane % 4;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int row = m0 + wm * 64 + mt * 16 + g, col = n0 + wn * 32 + nt * 8 + 2 * q;
            if (row < m) store_pair<Epilogue>(out, n, row, col, acc[mt][nt][0], acc[mt][nt][1]);
            if (row + 8 < m) store_pair<Epilogue>(out, n, row + 8, col, acc[mt][nt][2], acc[mt][nt][3]);
        }
}

// ---------------------------------------------------------------------------------------------

template <int MT, int Epilogue>
cudaError_t launch_skinny(void *out, const bi_bf16 *a, const bi_bf16 *w, int m, int n, int k, cudaStream_t stream) {
    // Two weight-row tiles per block where that still gives every SM work; one for narrow n.
    if (n % 16 == 0 && n >= 4096) {
        return bi::launch(skinny_kernel<MT, 2, Epilogue>, dim3(n / 16), dim3(kSkinnyWarps * bi::kWarp), 0, stream, out, a, w,
                          m, n, k);
    }
    return bi::launch(skinny_kernel<MT, 1, Epilogue>, dim3(n / 8), dim3(kSkinnyWarps * bi::kWarp), 0, stream, out, a, w, m,
                      n, k);
}

template <int Epilogue>
cudaError_t launch_linear(void *out, const bi_bf16 *a, const bi_bf16 *w, int m, int n, int k, cudaStream_t stream) {
    if (m <= 16) return launch_skinny<1, Epilogue>(out, a, w, m, n, k, stream);
    if (m <= 32) return launch_skinny<2, Epilogue>(out, a, w, m, n, k, stream);
    if (m <= 64) return launch_skinny<4, Epilogue>(out, a, w, m, n, k, stream);
    if (n % kTileN != 0) return cudaErrorInvalidValue;
    const cudaError_t e = cudaFuncSetAttribute(tiled_kernel<Epilogue>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(kTiledSmem));
    if (e != cudaSuccess) return e;
    const dim3 grid(n / kTileN, (m + kTileM - 1) / kTileM);
    return bi::launch(tiled_kernel<Epilogue>, grid, dim3(kTiledThreads), kTiledSmem, stream, out, a, w, m, n, k);
}

}  // namespace

extern "C" cudaError_t bi_linear(void *out, const bi_bf16 *a, const bi_bf16 *w, int m, int n, int k,
                                 bi_epilogue epilogue, cudaStream_t stream) {
    // k: whole 32-column chunks for each of the 4 skinny warps; n: whole 16-row tiles.
    if (m <= 0 || n <= 0 || k <= 0 || k % (kChunk * kSkinnyWarps) != 0 || n % 16 != 0) return cudaErrorInvalidValue;
    switch (epilogue) {
        case BI_EPILOGUE_STORE_F32: return launch_linear<BI_EPILOGUE_STORE_F32>(out, a, w, m, n, k, stream);
        case BI_EPILOGUE_ADD_RESIDUAL: return launch_linear<BI_EPILOGUE_ADD_RESIDUAL>(out, a, w, m, n, k, stream);
        case BI_EPILOGUE_SWIGLU: return launch_linear<BI_EPILOGUE_SWIGLU>(out, a, w, m, n, k, stream);
    }
    return cudaErrorInvalidValue;
}
