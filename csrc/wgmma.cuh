// Hopper's warpgroup matrix multiply (wgmma, sm_90a only): D[64, N] += A[64, 16] . B[N, 16]^T
// with f32 accumulators, both operands bf16 in shared memory, K-major (rows of k), in the
// 128-byte swizzle: a tile's rows are 64 bf16 (128 bytes) and row r's 16-byte chunk c sits at
// r * 128 + (c ^ r % 8) * 16 from a 1,024-byte aligned base. Accumulator d[j][e] of thread t of
// the warpgroup: row 16 * (t / 32) + (t % 32) / 4 + 8 * (e / 2), column 8 * j + 2 * (t % 4) + e % 2
// (the mma.sync m16n8 layout, one n8 tile per j).
#pragma once
#include <cstdint>

namespace bi::wgmma {

constexpr int kRowBytes = 128;  // one swizzled row: 64 bf16 of k
constexpr int kAlign = 1024;    // the swizzle pattern repeats every 8 rows

// Where chunk `c` (16 bytes) of row `r` of a swizzled tile lies, in bytes from its base.
__host__ __device__ constexpr int swizzled(int r, int c) { return r * kRowBytes + ((c ^ (r % 8)) << 4); }

// The descriptor of the swizzled tile at `tile`, advanced by `k` (a multiple of 16) along its rows:
// start address / 16, leading offset 16 bytes (unused in this swizzle), 8-row groups 1,024 bytes
// apart, 128-byte swizzle.
__device__ __forceinline__ uint64_t descriptor(const void *tile, int k) {
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(tile)) + k * 2;
    return (static_cast<uint64_t>(address & 0x3FFFF) >> 4) | (uint64_t{16 >> 4} << 16) | (uint64_t{kAlign >> 4} << 32) |
           (uint64_t{1} << 62);
}

// Orders this thread's generic-proxy writes to shared memory (cp.async included) before the
// async proxy's reads (wgmma operands).
__device__ __forceinline__ void fence_shared_writes() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

template <int N>
__device__ void mma_async(float (&d)[N / 8][4], uint64_t a, uint64_t b);

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <>
__device__ __forceinline__ void mma_async<64>(float (&d)[8][4], uint64_t a, uint64_t b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, 1, 1, 1, 0, 0;\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(a), "l"(b));
}

template <>
__device__ __forceinline__ void mma_async<128>(float (&d)[16][4], uint64_t a, uint64_t b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, 1, 1, 1, 0, 0;\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "l"(a), "l"(b));
}
#endif

}  // namespace bi::wgmma
