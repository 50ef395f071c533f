// Tensor-core building blocks shared by the linear kernels and the fused layer kernel: the mma,
// streaming weight loads, and the epilogues.
#pragma once
#include "common.cuh"

namespace bi {

constexpr int kChunk = 32;  // k columns per step: one 16-byte load per thread per weight row

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
        // __fdividef: IEEE division has a slow path that is a call, and a call in a kernel
        // serializes its wgmma (relocatable device code, as build.rs compiles).
        const float silu = __fdividef(v0, 1.0f + __expf(-v0));
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

// 16 bytes global -> shared memory, asynchronously (cp.async, L2 only); !valid fills zeros.
__device__ __forceinline__ void cp_async16(void *smem, const void *global, bool valid = true) {
    const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global), "r"(bytes));
}

// Four 8x8 bf16 matrices from shared memory as mma fragments (lane l gives the address of row
// l % 8 of matrix l / 8); Trans: transposed, for B operands stored k-major.
template <bool Trans = false>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *smem) {
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    if constexpr (Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
}

// Weights are read once per step: keep them out of L1.
__device__ __forceinline__ uint4 load_stream(const void *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    return static_cast<uint32_t>(bi::f32_to_bf16(lo)) | (static_cast<uint32_t>(bi::f32_to_bf16(hi)) << 16);
}

// ---- Weight types: bf16, or INT8 with one f32 scale per row, applied to the row's f32 sum.

// Bytes Lo and Lo + 1 of `biased` (int8 values XOR 0x80, i.e. q + 128) as a bf16 pair, exactly:
// byte u becomes the f32 2^23 + u, minus 2^23 + 128 leaves q, whose upper half is its bf16
// (|q| <= 127 fits bf16's 8-bit significand).
template <int Lo>
__device__ __forceinline__ uint32_t biased_bytes_to_bf16x2(uint32_t biased) {
    constexpr uint32_t kExponent = 0x4B000000u;  // 2^23
    const float lo = __uint_as_float(__byte_perm(biased, kExponent, 0x7650 + Lo)) - 8388736.0f;
    const float hi = __uint_as_float(__byte_perm(biased, kExponent, 0x7650 + Lo + 1)) - 8388736.0f;
    return __byte_perm(__float_as_uint(lo), __float_as_uint(hi), 0x7632);
}

// Two int8 weights (the low 16 bits) as a bf16 pair.
__device__ __forceinline__ uint32_t int8x2_to_bf16x2(uint32_t two) { return biased_bytes_to_bf16x2<0>(two ^ 0x8080u); }

// Eight consecutive weights of a row: the bits as stored (Raw) and as four bf16 pairs; a 16-byte
// streaming load (load_stream) holds kPerLoad of them, part(loaded, i) being the i-th.
template <typename W>
struct WeightChunk;

template <>
struct WeightChunk<bi_bf16> {
    using Raw = uint4;
    static constexpr bool kScaled = false;
    static constexpr int kPerLoad = 1;
    __device__ static __forceinline__ Raw part(uint4 loaded, int) { return loaded; }
    __device__ static __forceinline__ uint4 bf16(Raw raw) { return raw; }
};

template <>
struct WeightChunk<int8_t> {
    using Raw = uint2;
    static constexpr bool kScaled = true;
    static constexpr int kPerLoad = 2;
    __device__ static __forceinline__ Raw part(uint4 loaded, int i) {
        return i == 0 ? make_uint2(loaded.x, loaded.y) : make_uint2(loaded.z, loaded.w);
    }
    __device__ static __forceinline__ uint4 bf16(Raw raw) {
        const uint32_t lo = raw.x ^ 0x80808080u, hi = raw.y ^ 0x80808080u;
        return make_uint4(biased_bytes_to_bf16x2<0>(lo), biased_bytes_to_bf16x2<2>(lo), biased_bytes_to_bf16x2<0>(hi),
                          biased_bytes_to_bf16x2<2>(hi));
    }
};

// Eight weights of a row staged in shared memory, as four bf16 pairs.
template <typename W>
__device__ __forceinline__ uint4 staged_chunk(const W *p) {
    using Chunk = WeightChunk<W>;
    return Chunk::bf16(*reinterpret_cast<const typename Chunk::Raw *>(p));
}

// The scales of output columns col and col + 1: 1 for bf16 weights.
template <typename W>
__device__ __forceinline__ float2 column_scales(const float *scales, int col) {
    if constexpr (WeightChunk<W>::kScaled) return *reinterpret_cast<const float2 *>(scales + col);
    else return make_float2(1.0f, 1.0f);
}

// Calls f.template operator()<W>() with the weight type of `m`.
template <typename F>
__host__ __forceinline__ cudaError_t with_weight_type(const bi_matrix &m, F &&f) {
    if (m.values == nullptr) return cudaErrorInvalidValue;
    return m.scales == nullptr ? f(bi_bf16{}) : f(int8_t{});
}


// The A operand of a product: bf16 rows, or (Norm) f32 residual rows normalized on the fly.
struct Activations {
    const void *a;        // bf16 [m, k], or with Norm f32 [m, k]
    const bi_bf16 *norm;  // with Norm: [k]
    int m, k;
};

// 1/rms of every row (with Norm), one warp per row; the caller synchronizes before use.
__device__ __forceinline__ void row_inv_rms(const Activations &act, float eps, float *inv_rms) {
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
    for (int r = warp; r < act.m; r += warps) {
        const float *row = static_cast<const float *>(act.a) + static_cast<size_t>(r) * act.k;
        float sum_sq = 0.0f;
        for (int i = lane * 4; i < act.k; i += kWarp * 4) {
            const float4 v = *reinterpret_cast<const float4 *>(row + i);
            sum_sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        sum_sq = warp_sum(sum_sq);
        if (lane == 0) inv_rms[r] = rsqrtf(sum_sq / act.k + eps);
    }
}

// Eight consecutive f32 values x0, x1, times s and their bf16 norm weights `w`, as bf16 pairs.
__device__ __forceinline__ uint4 normalize_pack(float4 x0, float4 x1, uint4 w, float s) {
    auto lo = [](uint32_t v) { return __uint_as_float(v << 16); };
    auto hi = [](uint32_t v) { return __uint_as_float(v & 0xffff0000u); };
    return make_uint4(pack_bf16x2(x0.x * s * lo(w.x), x0.y * s * hi(w.x)), pack_bf16x2(x0.z * s * lo(w.y), x0.w * s * hi(w.y)),
                      pack_bf16x2(x1.x * s * lo(w.z), x1.y * s * hi(w.z)), pack_bf16x2(x1.z * s * lo(w.w), x1.w * s * hi(w.w)));
}

// Eight consecutive A values of `row` from column `col`, as bf16 pairs (zeros past m).
template <bool Norm>
__device__ __forceinline__ uint4 a_chunk(const Activations &act, int row, int col, const float *inv_rms) {
    if (row >= act.m) return make_uint4(0, 0, 0, 0);
    if constexpr (!Norm) {
        return *reinterpret_cast<const uint4 *>(static_cast<const bi_bf16 *>(act.a) + static_cast<size_t>(row) * act.k + col);
    } else {
        const float4 *x = reinterpret_cast<const float4 *>(static_cast<const float *>(act.a) + static_cast<size_t>(row) * act.k + col);
        const float4 x0 = x[0], x1 = x[1];
        const uint4 wbits = *reinterpret_cast<const uint4 *>(act.norm + col);
        return normalize_pack(x0, x1, wbits, inv_rms[row]);
    }
}

}  // namespace bi
