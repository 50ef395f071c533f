// One transformer layer of a decode step in one launch (up to 16 rows, one per sequence), with
// bf16 or INT8 weights.
//
// A persistent grid, one block per SM (16 compute warps and a copy warp), runs the layer's
// five phases:
//   qkv = rmsnorm(x) . Wqkv^T | q/k norm + RoPE, K/V into the cache, attention | x += attn . Wo^T
//   | act = SwiGLU(rmsnorm(x) . Wgu^T) | x += act . Wdown^T
// Each block owns tiles of 8 weight rows of every product. Weights never depend on
// activations, so the moment the block starts, its copy warp hands the copy engine its tiles of
// qkv, o and gate/up (bulk copies into shared memory, one mbarrier per tile) in the order the
// phases need them, at most kCopyWindow bytes in flight; the down tile follows into qkv's space
// once attention is done. DRAM streams the layer while the grid synchronizes, and a product
// waits only for tiles still in flight. Dependencies: the qkv tiles go to blocks by kv head, and
// attention of a kv head waits only for its 16 qkv blocks (completion counters); o, gate/up and
// down each need every block's output before them (grid barriers: one atomic, acquire polls).
// Between layers, programmatic dependent launch: a block of the next layer starts as soon as
// this layer's block on its SM exits, and starts streaming before it waits for this layer.
//
// Measured on an H200 (benches/decode.rs, batch 1, context 1024, 2026-11-22), in the order
// tried; tok/s of the whole step:
//   separate kernels (6 per layer, 172 graph nodes)                                  888
//   weights in registers per phase, whole-layer L2 prefetch, grid barriers             943
//   all tiles staged in shared memory by one of the compute warps at the start         824
//     (issuing ~100 bulk copies took ~6 us, during which no product could start)
//   a dedicated copy warp with a 48 KiB window                                          992
//   + release/acquire barrier (no fences), A fragments read once per phase             1,036
//   + one block barrier per group of tiles instead of per tile; attention reads its
//     first round of K/V before q, ranges start on cache blocks, merge counter acq_rel   1,082
//   + attention waits for the qkv blocks of its kv head only (no grid barrier)         1,103
//   + the layer's norms and RoPE frequencies staged with the first copies; the L2
//     prefetch below removed (final code; runs on three machines: 1,130 / 1,138 / 1,167) 1,138
//   - the next layer's qkv pulled into L2 during this layer: removed, it cost 0.6 us
//     per layer (0.889 vs 0.908 ms per step)
//   copy window 16..256 KiB: within 1.5% (16 and 24 KiB best by 0.9%; a later run: 24 KiB
//   0.903, 48 KiB 0.882, 96 KiB 0.878 ms per step)
//   the ranges' merge moved from the last attention block into the o product (each warp
//   merging its head's partials): o then took ~7 us, every block reading every head's
//   partials from L2 (~25 MB per layer); 1,020-1,036 tok/s. Reverted.
//   a barrier of per-block flags (each block publishes its count, warp 0 polls all 132):
//   ~3 us per barrier instead of ~1.1 (1,000 tok/s); the single counter stays
//   tried and reverted: K/V of the first round read into registers before the qkv
//   barrier (spills under the 96-register cap of 17 warps: 864); all 28 layers in one
//   launch (an earlier register-based version: 860).
//   attention scores on the tensor core (attention.cuh: 8 positions per warp round, the
//   warp-wide dot-product reductions gone): attention 8.1 -> 6.2 us per layer, 1,151 ->
//   1,204 tok/s (context 1024; timeline below from before it: attention now ends ~0.4 us
//   earlier, 12.3 median / 15.4 last block).
//   the next K/V round of an attention range asked of L2 while a round computes (no
//   registers for a register prefetch): batch 1 unchanged (its ranges are one round), batch
//   16 +2% at context 512 and +8% at 2,048 (see attention.cuh).
// INT8 weights (layer_kernel<int8_t>: tiles of int8 rows, converted to bf16 fragments when read
// from shared memory, row scales applied to the reduced sums): 1,253 tok/s at context 1024
// (598 MB per step instead of 1,192; 0.798 ms, of which the LM head saves most): the layer
// is bound by its chain of dependent steps, not by its bytes.
// The per-block timeline (decode benchmark --trace, 19 stamps per block; us after the layer's
// first block starts, median block, bf16, context 1024; INT8 within 0.5 us of it everywhere):
//   previous layer done 1.4 | qkv: A (x read, RMS sums shared) 2.9, tiles multiplied 4.2 (the
//   last tiles arriving from DRAM), stored and signalled 6.1 | kv head ready 8.0 | attention
//   12.7 (last block 16.8: the merge tail) | barrier 17.7 | o: A 18.2, multiplied 18.9, stored
//   19.2 | barrier 20.3 | gate/up: A 21.5, multiplied 22.8, stored 23.1 | barrier 24.2 |
//   down: A 24.9, multiplied 25.7, stored 25.9.
// So a layer is a chain of ~13 dependent hops between SMs (a read of what other blocks wrote,
// or a release of what this block wrote: ~0.5-2 us each) with little compute between them;
// the weights (DRAM needs ~7.5 us of the layer) are never what a phase waits for except the
// qkv tiles, which cannot start before the layer's launch. Halving the weight bytes (INT8)
// shortens the layer by ~0.1 us. The bar (80% of copy bandwidth, ~10 us per layer with the LM
// head) needs the chain and the weight stream to overlap across layers: the next layer's
// weights streaming into shared memory during this layer's chain, which one launch per layer
// rules out (shared memory does not outlive a launch, the next layer's blocks cannot be
// resident beside this one's, and an L2 prefetch measured slower).
#include "attention.cuh"
#include "bulk_copy.cuh"
#include "matvec.cuh"

namespace {

constexpr int kWarps = 16;                          // compute warps
constexpr int kComputeThreads = kWarps * bi::kWarp;
constexpr int kThreads = kComputeThreads + bi::kWarp;  // and one copy warp
constexpr int kCopyWarp = kWarps;
constexpr int kMaxRows = 16;  // one m16 tile of the tensor-core product
constexpr int kTileRows = 8;  // weight rows per tile: the n8 of the mma
// A staged row is padded by 64 bytes, so the 8 rows a warp reads at once alternate halves of
// the shared-memory banks (row strides are multiples of 128 bytes otherwise): no conflicts.
constexpr int kRowPad = 32;
// Most weight bytes the copy warp keeps in flight per block. Enough to keep DRAM busy (132
// blocks x 48 KiB = 6.3 MB against ~3.4 MB in flight at 4 TB/s and 0.8 us), few enough that
// the loads and atomics on the critical path do not queue behind megabytes of weights.
constexpr uint32_t kCopyWindow = 48 * 1024;  // default of bi_layer_state.copy_window
using Attention = bi::attn::Core<kWarps>;  // on the compute warps

constexpr int kQkvRows = (BI_Q_HEADS + 2 * BI_KV_HEADS) * BI_HEAD_DIM;
constexpr int kQWidth = BI_Q_HEADS * BI_HEAD_DIM;

// Shared-memory elements of one staged tile of a [n, k] matrix (bf16 or INT8 weights).
constexpr int tile_elems(int k) { return kTileRows * (k + kRowPad); }
// The most tiles of an n-row matrix a block owns on the smallest grid.
constexpr int max_tiles(int n) { return (n / kTileRows + BI_FUSED_DECODE_MIN_SMS - 1) / BI_FUSED_DECODE_MIN_SMS; }
constexpr int kBlocksPerKvHead = BI_HEAD_DIM / kTileRows;  // 16: one k tile and one v tile each
constexpr int kHeadBlocks = BI_KV_HEADS * kBlocksPerKvHead;  // 128 blocks produce qkv
static_assert(kHeadBlocks <= BI_FUSED_DECODE_MIN_SMS, "every qkv tile has a block");
static_assert(kQkvRows / kTileRows == kHeadBlocks * 4, "four qkv tiles per producing block");
constexpr int kQkvTiles = max_tiles(kQkvRows), kGateUpTiles = max_tiles(2 * BI_INTERMEDIATE), kNarrowTiles = max_tiles(BI_HIDDEN);
static_assert(kNarrowTiles == 1, "o and down: at most one tile per block");

// Dynamic shared memory, in bytes, for weights of type W: region A holds the qkv tiles, then the
// attention scratch, then the down tile; B the o tile; C the gate/up tiles; then the products'
// partial sums, the warps' sums of squares of the rows and the layer's vectors.
constexpr int larger(int a, int b) { return a > b ? a : b; }
constexpr int kReduceFloats = 4096;  // partial sums: [tiles][kWarps][rows][8]
// The layer's small vectors, staged with the first copies: input and post-attention norms, q and
// k norms, RoPE frequencies.
struct Vectors {
    bi_bf16 input_norm[BI_HIDDEN], post_norm[BI_HIDDEN], q_norm[BI_HEAD_DIM], k_norm[BI_HEAD_DIM];
    float inv_freq[BI_HEAD_DIM / 2];
};
static_assert(sizeof(Vectors) % 16 == 0 && offsetof(Vectors, inv_freq) % 16 == 0, "bulk copies move 16-byte units");
template <typename W>
struct Layout {
    static constexpr int kRegionA = larger(larger(kQkvTiles * tile_elems(BI_HIDDEN), tile_elems(BI_INTERMEDIATE)) * sizeof(W),
                                           Attention::kSmemFloats * 4);
    static constexpr int kRegionB = tile_elems(kQWidth) * sizeof(W);
    static constexpr int kRegionC = kGateUpTiles * tile_elems(BI_HIDDEN) * sizeof(W);
    static constexpr int kBytes = kRegionA + kRegionB + kRegionC + (kReduceFloats + kWarps * kMaxRows) * 4 + sizeof(Vectors);
    static_assert(kBytes <= 227 * 1024, "an H100/H200 block has 227 KiB of shared memory");
    static_assert(kRegionA % 16 == 0 && kRegionB % 16 == 0 && kRegionC % 16 == 0, "bulk copies land on 16-byte boundaries");
};

static_assert(kReduceFloats >= kWarps * kMaxRows * kTileRows, "a group holds at least one tile");
static_assert(kComputeThreads >= kReduceFloats / kWarps / 2, "a thread per output pair of a group");

// mbarriers: one per staged tile, and one the compute warps complete once region A is free.
constexpr int kQkvBar = 0, kOBar = kQkvTiles, kGateUpBar = kOBar + 1, kDownBar = kGateUpBar + kGateUpTiles,
              kVectorsBar = kDownBar + 1, kBars = kVectorsBar + 1;
// Named barrier 2: the compute warps arrive once they are done with region A, the copy warp
// waits there before it copies the down tile over it.
constexpr int kRegionAFree = 2;

// Which tiles of an n-row matrix this block owns. Strided: blockIdx.x, blockIdx.x + gridDim.x,
// ... For qkv, by kv head: block 16 h + j (h < 8, j < 16) owns query tiles 32 h + 2 j and
// 32 h + 2 j + 1 and key and value tiles 16 h + j, so the 16 blocks 16 h .. 16 h + 15 produce
// everything attention needs of kv head h, and attention waits for them alone.
struct TileMap {
    int n;
    bool by_kv_head;

    __device__ __forceinline__ int count() const {
        if (by_kv_head) return blockIdx.x < kHeadBlocks ? kQkvTiles : 0;
        const int tiles = n / kTileRows;
        return static_cast<int>(blockIdx.x) < tiles ? (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    }
    __device__ __forceinline__ int tile(int i) const {
        if (!by_kv_head) return blockIdx.x + i * gridDim.x;
        const int h = blockIdx.x / kBlocksPerKvHead, j = blockIdx.x % kBlocksPerKvHead;
        constexpr int kQTiles = kQWidth / kTileRows, kKvTiles = BI_KV_HEADS * BI_HEAD_DIM / kTileRows;
        constexpr int kQPerBlock = BI_Q_HEADS / BI_KV_HEADS * BI_HEAD_DIM / kTileRows / kBlocksPerKvHead;
        const int per_head = BI_HEAD_DIM / kTileRows;  // tiles of one k or v head
        if (i < kQPerBlock) return h * kQPerBlock * kBlocksPerKvHead + kQPerBlock * j + i;
        return kQTiles + (i - kQPerBlock) * kKvTiles + h * per_head + j;  // its k tile, then its v tile
    }
};

// The copy warp's queue: tiles go to the copy engine in the order the phases need them, with at
// most `window` bytes in flight (it waits for the oldest tile to land before going over).
class CopyQueue {
  public:
    __device__ CopyQueue(uint64_t policy, uint32_t window) : policy_(policy), window_(window) {}

    // This block's tiles of w [n, k] into `dst`, tile i completing bars[i]. Lanes 0..7 each
    // copy one row of a tile.
    template <typename W>
    __device__ __forceinline__ void stage(W *dst, const W *w, TileMap map, int k, uint64_t *bars) {
        const int lane = threadIdx.x % bi::kWarp;
        const uint32_t row_bytes = k * sizeof(W), tile_bytes = kTileRows * row_bytes;
        for (int i = 0; i < map.count(); ++i) {
            make_room(tile_bytes);
            if (lane == 0) bi::mbarrier_arrive_expect_bytes(&bars[i], tile_bytes);
            __syncwarp();
            if (lane < kTileRows) {
                const size_t row = static_cast<size_t>(map.tile(i)) * kTileRows + lane;
                bi::bulk_copy_to_shared(dst + i * tile_elems(k) + lane * (k + kRowPad), w + row * k, row_bytes, &bars[i], policy_);
            }
            push(&bars[i], tile_bytes);
        }
    }

    // The layer's small vectors, by lane 0.
    __device__ __forceinline__ void stage_vectors(Vectors &vec, const bi_layer_weights &w, const float *inv_freq, uint64_t *bar) {
        if (threadIdx.x % bi::kWarp != 0) return;
        bi::mbarrier_arrive_expect_bytes(bar, sizeof(Vectors));
        bi::bulk_copy_to_shared(vec.input_norm, w.input_norm, sizeof(vec.input_norm), bar, policy_);
        bi::bulk_copy_to_shared(vec.post_norm, w.post_norm, sizeof(vec.post_norm), bar, policy_);
        bi::bulk_copy_to_shared(vec.q_norm, w.q_norm, sizeof(vec.q_norm), bar, policy_);
        bi::bulk_copy_to_shared(vec.k_norm, w.k_norm, sizeof(vec.k_norm), bar, policy_);
        bi::bulk_copy_to_shared(vec.inv_freq, inv_freq, sizeof(vec.inv_freq), bar, policy_);
    }

    // Waits until every staged tile landed.
    __device__ __forceinline__ void drain() {
        while (count_ > 0) pop();
    }

  private:
    static constexpr int kSlots = 16;
    __device__ __forceinline__ void make_room(uint32_t bytes) {
        while (count_ > 0 && (in_flight_ + bytes > window_ || count_ == kSlots)) pop();
    }
    __device__ __forceinline__ void push(uint64_t *bar, uint32_t bytes) {
        bars_[(head_ + count_) % kSlots] = bar, bytes_[(head_ + count_) % kSlots] = bytes;
        ++count_, in_flight_ += bytes;
    }
    __device__ __forceinline__ void pop() {
        bi::mbarrier_wait(bars_[head_], 0);
        in_flight_ -= bytes_[head_], head_ = (head_ + 1) % kSlots, --count_;
    }
    uint64_t policy_;
    uint32_t window_;
    uint64_t *bars_[kSlots];
    uint32_t bytes_[kSlots];
    int head_ = 0, count_ = 0;
    uint32_t in_flight_ = 0;
};

// The A fragments of this thread for the warp's columns [w K / 16, (w + 1) K / 16) of rows g
// and g + 8 (zeros past m). With Norm, rows are RMS-normalized: every warp's sums of squares
// meet in `sums` ([kWarps][kMaxRows] floats), so the rows are read once.
template <int K, bool Norm>
__device__ __forceinline__ void load_a(const bi::Activations &act, float eps, uint4 (&lo)[K / kWarps / bi::kChunk],
                                       uint4 (&hi)[K / kWarps / bi::kChunk], float *sums) {
    constexpr int kChunks = K / kWarps / bi::kChunk;
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp, g = lane / 4, q = lane % 4;
    auto column = [&](int c) { return warp * (K / kWarps) + 8 * q + c * bi::kChunk; };
    if constexpr (!Norm) {
#pragma unroll
        for (int c = 0; c < kChunks; ++c)
            lo[c] = bi::a_chunk<false>(act, g, column(c), nullptr), hi[c] = bi::a_chunk<false>(act, g + 8, column(c), nullptr);
    } else {
        float4 x[2][kChunks][2];  // [row g, g + 8][chunk][8 values]
        uint4 norm[kChunks];
        float sum_sq[2] = {};
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
            norm[c] = *reinterpret_cast<const uint4 *>(act.norm + column(c));
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = g + 8 * h;
                const float4 *src = reinterpret_cast<const float4 *>(static_cast<const float *>(act.a) + row * K + column(c));
                x[h][c][0] = row < act.m ? src[0] : make_float4(0, 0, 0, 0);
                x[h][c][1] = row < act.m ? src[1] : make_float4(0, 0, 0, 0);
#pragma unroll
                for (int i = 0; i < 2; ++i)
                    sum_sq[h] += x[h][c][i].x * x[h][c][i].x + x[h][c][i].y * x[h][c][i].y + x[h][c][i].z * x[h][c][i].z +
                                 x[h][c][i].w * x[h][c][i].w;
            }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // the 4 lanes of a row
            sum_sq[h] += __shfl_xor_sync(0xffffffffu, sum_sq[h], 1);
            sum_sq[h] += __shfl_xor_sync(0xffffffffu, sum_sq[h], 2);
            if (q == 0) sums[warp * kMaxRows + g + 8 * h] = sum_sq[h];
        }
        bi::sync_warps<kWarps>();
        float inv_rms[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float total = 0.0f;
#pragma unroll
            for (int from = 0; from < kWarps; ++from) total += sums[from * kMaxRows + g + 8 * h];
            inv_rms[h] = rsqrtf(total / K + eps);
        }
#pragma unroll
        for (int c = 0; c < kChunks; ++c)
            lo[c] = bi::normalize_pack(x[0][c][0], x[0][c][1], norm[c], inv_rms[0]),
            hi[c] = bi::normalize_pack(x[1][c][0], x[1][c][1], norm[c], inv_rms[1]);
    }
}

// out = act . W^T for this block's tiles of W [n, K] in `staged`, then the epilogue. Warp w
// multiplies columns [w K / 16, (w + 1) K / 16) of every tile as it lands (its A fragments
// loaded once, before the first tile) and leaves its partial sums in shared memory; once a group
// of tiles is done (all of them unless m is large), one block barrier, then thread t sums one
// output pair over the 16 warps and scales it (INT8 rows; the scales and an added residual are
// read before the tiles land). smem: kReduceFloats + kWarps * kMaxRows floats. Compute warps only.
// stamp(): the timeline's clock, once the A fragments are loaded and once every tile is multiplied.
template <int K, int Epilogue, bool Norm, typename W, typename Stamp>
__device__ __forceinline__ void product(const W *staged, const float *scales, uint64_t *bars, const bi::Activations &act,
                                        float eps, void *out, TileMap map, float *smem, Stamp &stamp) {
    constexpr int kChunks = K / kWarps / bi::kChunk;
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp, g = lane / 4, q = lane % 4, m = act.m;
    uint4 a_lo[kChunks], a_hi[kChunks];
    load_a<K, Norm>(act, eps, a_lo, a_hi, smem + kReduceFloats);
    stamp();
    float *partials = smem;  // [group][kWarps][m][8]
    const int n = map.n, count = map.count(), group = kReduceFloats / (kWarps * m * kTileRows);
    // This thread's output pair in a group: tile, row, columns 2 pair, 2 pair + 1.
    const int my_tile = threadIdx.x / (4 * m), my_row = threadIdx.x / 4 % m, my_pair = threadIdx.x % 4;
    for (int first = 0; first < count; first += group) {
        const int tiles = min(group, count - first);
        const bool reducer = my_tile < tiles;
        const int col = map.tile(first + min(my_tile, tiles - 1)) * kTileRows + 2 * my_pair;
        float2 residual = make_float2(0.0f, 0.0f), scale = make_float2(1.0f, 1.0f);
        if (reducer) {
            if constexpr (Epilogue == BI_EPILOGUE_ADD_RESIDUAL)
                residual = *reinterpret_cast<const float2 *>(static_cast<float *>(out) + my_row * n + col);
            scale = bi::column_scales<W>(scales, col);
        }
        for (int i = 0; i < tiles; ++i) {
            bi::mbarrier_wait(&bars[first + i], 0);
            const W *w = staged + (first + i) * tile_elems(K) + g * (K + kRowPad) + warp * (K / kWarps) + 8 * q;
            float acc[4] = {};
#pragma unroll
            for (int c = 0; c < kChunks; ++c) {
                const uint4 b = bi::staged_chunk(w + c * bi::kChunk);
                bi::mma_bf16(acc, a_lo[c].x, a_hi[c].x, a_lo[c].y, a_hi[c].y, b.x, b.y);
                bi::mma_bf16(acc, a_lo[c].z, a_hi[c].z, a_lo[c].w, a_hi[c].w, b.z, b.w);
            }
            float *part = partials + (i * kWarps + warp) * m * kTileRows;
            if (g < m) *reinterpret_cast<float2 *>(part + g * kTileRows + 2 * q) = make_float2(acc[0], acc[1]);
            if (g + 8 < m) *reinterpret_cast<float2 *>(part + (g + 8) * kTileRows + 2 * q) = make_float2(acc[2], acc[3]);
        }
        if (first + group >= count) stamp();
        bi::sync_warps<kWarps>();
        if (reducer) {
            float2 sum = make_float2(0.0f, 0.0f);
#pragma unroll
            for (int from = 0; from < kWarps; ++from) {
                const float2 p =
                    *reinterpret_cast<const float2 *>(partials + ((my_tile * kWarps + from) * m + my_row) * kTileRows + 2 * my_pair);
                sum.x += p.x, sum.y += p.y;
            }
            constexpr int kStore = Epilogue == BI_EPILOGUE_ADD_RESIDUAL ? BI_EPILOGUE_STORE_F32 : Epilogue;
            bi::store_pair<kStore>(out, n, my_row, col, residual.x + sum.x * scale.x, residual.y + sum.y * scale.y);
        }
        bi::sync_warps<kWarps>();  // the partials are reused by the next group or phase
    }
    if (count == 0) stamp();
}

// All blocks of the grid meet here. `arrivals` only grows (64 bits: it never wraps), so a
// barrier is one atomic add and a poll, with nothing to reset between barriers or launches. The
// add releases the block's writes (ordered before it by the block barrier), the poll acquires
// everyone's.
__device__ __forceinline__ void grid_barrier(unsigned long long *arrivals) {
    bi::sync_warps<kWarps>();
    if (threadIdx.x == 0) {
        unsigned long long ticket, seen;
        asm volatile("atom.add.release.gpu.u64 %0, [%1], 1;\n" : "=l"(ticket) : "l"(arrivals) : "memory");
        const unsigned long long release = (ticket / gridDim.x + 1) * gridDim.x;
        do {
            asm volatile("ld.acquire.gpu.u64 %0, [%1];\n" : "=l"(seen) : "l"(arrivals) : "memory");
        } while (seen < release);
    }
    bi::sync_warps<kWarps>();
}

// Grid barriers per launch: after attention, after o, after gate/up.
constexpr int kGridBarriers = 3;

// This launch's index among the launches sharing `arrivals` (thread 0, before the block's first
// barrier): every block of the previous launch has passed its last barrier before this block
// starts (its SM was busy until then), and this launch's first barrier cannot complete before
// this block arrives.
__device__ __forceinline__ unsigned long long launch_index(const unsigned long long *arrivals) {
    return *reinterpret_cast<const volatile unsigned long long *>(arrivals) / (kGridBarriers * gridDim.x);
}

// Per kv head h, heads[h] counts the qkv blocks done with it, kBlocksPerKvHead per launch.
// Signal: the block's qkv results were stored (the block barrier orders them before the add).
__device__ __forceinline__ void signal_kv_head(unsigned long long *heads) {
    if (threadIdx.x == 0 && blockIdx.x < kHeadBlocks)
        asm volatile("red.release.gpu.global.add.u64 [%0], 1;\n" ::"l"(heads + blockIdx.x / kBlocksPerKvHead) : "memory");
}

// Waits until every qkv block of `kv_head` signalled in launch `launch` (thread 0's value).
__device__ __forceinline__ void wait_kv_head(const unsigned long long *heads, int kv_head, unsigned long long launch) {
    if (threadIdx.x == 0) {
        const unsigned long long target = (launch + 1) * kBlocksPerKvHead;
        unsigned long long seen;
        do {
            asm volatile("ld.acquire.gpu.u64 %0, [%1];\n" : "=l"(seen) : "l"(heads + kv_head) : "memory");
        } while (seen < target);
    }
    bi::sync_warps<kWarps>();
}

// Attention work items (row, kv head, range), item i on block i mod grid.
struct Item {
    int row, kv_head, split, pos;
    const int32_t *table;  // the row's block table
};

__device__ __forceinline__ Item attention_item(const bi_layer_state &st, int item) {
    const int row = item / (BI_KV_HEADS * st.splits);
    const int pos = st.positions[row];
    return {row, item / st.splits % BI_KV_HEADS, item % st.splits, pos,
            st.block_tables + static_cast<size_t>(st.row_seq[row]) * st.max_blocks};
}

// Every item: q/k norm + RoPE, the new K/V into the cache, attention, once the qkv blocks of its
// kv head are done (wait_heads; launch: launch_index's). first: the block's first item, looked up
// early (positions and block tables do not change in a step). stamp(): once, when the first
// item's kv head is ready.
template <typename Stamp>
__device__ void attention_phase(const bi_layer_weights &w, const bi_layer_state &st, const Vectors &vec, const Item &first,
                                bool wait_heads, unsigned long long launch, float *smem, Stamp &stamp) {
    bool stamped = false;
    using namespace bi::attn;
    const int warp = threadIdx.x / bi::kWarp, lane = threadIdx.x % bi::kWarp;
    const Args args{st.attn, st.partials, st.counters, w.k_cache, w.v_cache};
    for (int item = blockIdx.x; item < st.m * BI_KV_HEADS * st.splits; item += gridDim.x) {
        const auto [row, kv_head, split, pos, table] = item == static_cast<int>(blockIdx.x) ? first : attention_item(st, item);
        if (pos < 0) {  // padding row: zeros
            if (split == 0)
                for (int i = threadIdx.x; i < kGroup * BI_HEAD_DIM; i += kComputeThreads)
                    st.attn[(static_cast<size_t>(row) * BI_Q_HEADS + kv_head * kGroup) * BI_HEAD_DIM + i] = 0;
            continue;
        }
        const int active = Attention::split_range(pos, split, st.splits).active;
        if (split >= active) continue;  // a short context uses fewer ranges
        const Round round0 = Attention::first_round(args, table, kv_head, split, st.splits, pos);
        if (wait_heads) wait_kv_head(st.arrivals + 1, kv_head, launch);
        if (!stamped) stamp(), stamped = true;
        // Both query heads, normalized and rotated by warps 0 and 1, rounded to bf16 as the
        // separate kernels store them, staged in shared memory for the other warps' mma
        // fragments; the range that ends at `pos` writes the new K and V (attend_split reads them
        // back). prepare_decode_item's work, written out: calling it cost batch 1 0.6% (H200).
        const float *qkv = st.qkv + static_cast<size_t>(row) * (BI_Q_HEADS + 2 * BI_KV_HEADS) * BI_HEAD_DIM;
        bi_bf16 *heads = reinterpret_cast<bi_bf16 *>(smem + Attention::kMergeFloats);  // [kGroup][128]
        if (warp < kGroup) {
            float qh[kDims];
            norm_rope(qh, qkv + (kv_head * kGroup + warp) * BI_HEAD_DIM, vec.q_norm, pos, vec.inv_freq, st.eps);
            store_bf16x4(heads + warp * BI_HEAD_DIM + kDims * lane, qh);
        }
        if (split == active - 1) {
            const size_t slot = kv_row(table[pos / BI_BLOCK_TOKENS], kv_head, pos) + kDims * lane;
            if (warp == 0) {
                float k[kDims];
                norm_rope(k, qkv + (BI_Q_HEADS + kv_head) * BI_HEAD_DIM, vec.k_norm, pos, vec.inv_freq, st.eps);
                store_bf16x4(w.k_cache + slot, k);
            } else if (warp == 1) {
                const float4 v4 = *reinterpret_cast<const float4 *>(qkv + (BI_Q_HEADS + BI_KV_HEADS + kv_head) * BI_HEAD_DIM + kDims * lane);
                store_bf16x4(w.v_cache + slot, {v4.x, v4.y, v4.z, v4.w});
            }
        }
        bi::sync_warps<kWarps>();
        QueryFragments qa;
        load_query(qa, heads);
        Attention::attend_split<false>(args, row, kv_head, split, st.splits, pos, table, qa, round0, smem);
        bi::sync_warps<kWarps>();  // shared memory is reused by the next item
    }
    if (!stamped) stamp();
}

// One launch per layer; W: the matrices' element type (bi_bf16, or int8_t with row scales);
// Traced: the variant that records the timeline (its stamps cost the step ~3%).
template <typename W, bool Traced>
__global__ void __launch_bounds__(kThreads, 1) layer_kernel(bi_layer_weights w, bi_layer_state st) {
    using L = Layout<W>;
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ uint64_t bars[kBars];
    W *region_a = reinterpret_cast<W *>(smem), *region_b = reinterpret_cast<W *>(smem + L::kRegionA),
      *region_c = reinterpret_cast<W *>(smem + L::kRegionA + L::kRegionB);
    float *scratch = reinterpret_cast<float *>(smem + L::kRegionA + L::kRegionB + L::kRegionC);
    auto values = [](const bi_matrix &matrix) { return static_cast<const W *>(matrix.values); };
    Vectors &vec = *reinterpret_cast<Vectors *>(scratch + kReduceFloats + kWarps * kMaxRows);
    const int warp = threadIdx.x / bi::kWarp;
    const uint32_t skip = st.skip_phases;
    bi::allow_next_kernel();
    if (threadIdx.x == 0) {
        for (int i = 0; i < kBars; ++i) bi::mbarrier_init(&bars[i], 1);
        bi::fence_mbarrier_init();
    }
    __syncthreads();

    if (warp == kCopyWarp) {  // weights never depend on earlier kernels: no wait
        CopyQueue queue(bi::evict_first_policy(), st.copy_window > 0 ? st.copy_window : kCopyWindow);
        queue.stage_vectors(vec, w, st.rope_inv_freq, &bars[kVectorsBar]);
        if (!(skip & BI_SKIP_QKV)) queue.stage(region_a, values(w.qkv), {kQkvRows, true}, BI_HIDDEN, &bars[kQkvBar]);
        if (!(skip & BI_SKIP_O)) queue.stage(region_b, values(w.o), {BI_HIDDEN, false}, kQWidth, &bars[kOBar]);
        if (!(skip & BI_SKIP_GATE_UP))
            queue.stage(region_c, values(w.gate_up), {2 * BI_INTERMEDIATE, false}, BI_HIDDEN, &bars[kGateUpBar]);
        asm volatile("bar.sync %0, %1;\n" ::"n"(kRegionAFree), "n"(kThreads) : "memory");
        bi::fence_proxy_async_shared();  // the compute warps' use of region A comes first
        if (!(skip & BI_SKIP_DOWN)) queue.stage(region_a, values(w.down), {BI_HIDDEN, false}, BI_INTERMEDIATE, &bars[kDownBar]);
        queue.drain();
        return;
    }

    int event = 0;
    auto stamp = [&] {
        if constexpr (Traced) {
            if (threadIdx.x == 0 && event < BI_TRACE_EVENTS) {
                unsigned long long now;
                asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
                st.trace[blockIdx.x * BI_TRACE_EVENTS + event] = now;
            }
            ++event;
        }
    };
    const bool sync = !(skip & BI_SKIP_BARRIERS);
    auto barrier = [&] {
        if (sync) grid_barrier(st.arrivals);
        stamp();
    };
    stamp();
    const unsigned long long launch = threadIdx.x == 0 ? launch_index(st.arrivals) : 0;
    bi::wait_for_previous_kernel();
    bi::mbarrier_wait(&bars[kVectorsBar], 0);
    stamp();
    auto skipped = [&] { stamp(), stamp(); };  // a left-out product's two stamps
    if (!(skip & BI_SKIP_QKV))
        product<BI_HIDDEN, BI_EPILOGUE_STORE_F32, true>(region_a, w.qkv.scales, &bars[kQkvBar],
                                                        {st.x, vec.input_norm, st.m, BI_HIDDEN}, st.eps, st.qkv,
                                                        {kQkvRows, true}, scratch, stamp);
    else
        skipped();
    if (sync) signal_kv_head(st.arrivals + 1);
    stamp();
    const Item first_item = static_cast<int>(blockIdx.x) < st.m * BI_KV_HEADS * st.splits ? attention_item(st, blockIdx.x) : Item{};
    if (!(skip & BI_SKIP_ATTENTION))
        attention_phase(w, st, vec, first_item, sync, launch, reinterpret_cast<float *>(region_a), stamp);
    else
        stamp();
    asm volatile("bar.arrive %0, %1;\n" ::"n"(kRegionAFree), "n"(kThreads) : "memory");  // region A is free
    stamp();
    barrier();
    if (!(skip & BI_SKIP_O))
        product<kQWidth, BI_EPILOGUE_ADD_RESIDUAL, false>(region_b, w.o.scales, &bars[kOBar], {st.attn, nullptr, st.m, kQWidth},
                                                         st.eps, st.x, {BI_HIDDEN, false}, scratch, stamp);
    else
        skipped();
    stamp();
    barrier();
    if (!(skip & BI_SKIP_GATE_UP))
        product<BI_HIDDEN, BI_EPILOGUE_SWIGLU, true>(region_c, w.gate_up.scales, &bars[kGateUpBar],
                                                    {st.x, vec.post_norm, st.m, BI_HIDDEN}, st.eps, st.act,
                                                    {2 * BI_INTERMEDIATE, false}, scratch, stamp);
    else
        skipped();
    stamp();
    barrier();
    if (!(skip & BI_SKIP_DOWN))
        product<BI_INTERMEDIATE, BI_EPILOGUE_ADD_RESIDUAL, false>(region_a, w.down.scales, &bars[kDownBar],
                                                                 {st.act, nullptr, st.m, BI_INTERMEDIATE}, st.eps, st.x,
                                                                 {BI_HIDDEN, false}, scratch, stamp);
    else
        skipped();
    stamp();
}

}  // namespace

extern "C" cudaError_t bi_decode_layer(const bi_layer_weights *weights, const bi_layer_state *state, cudaStream_t stream) {
    if (weights == nullptr || state == nullptr || state->m <= 0 || state->m > kMaxRows || state->splits <= 0 ||
        state->splits > BI_MAX_SPLITS || state->max_blocks <= 0)
        return cudaErrorInvalidValue;
    int sms = 0;
    if (const cudaError_t e = bi::multiprocessors(sms); e != cudaSuccess) return e;
    if (sms < BI_FUSED_DECODE_MIN_SMS) return cudaErrorInvalidConfiguration;
    const bool int8 = weights->qkv.scales != nullptr;
    for (const bi_matrix *m : {&weights->qkv, &weights->o, &weights->gate_up, &weights->down})
        if (m->values == nullptr || (m->scales != nullptr) != int8) return cudaErrorInvalidValue;
    return bi::with_weight_type(weights->qkv, [&](auto type) {
        using W = decltype(type);
        // Both variants, so that the first launch (the engine's warm-up) loads the traced one too
        // before a graph capture could need it.
        for (auto kernel : {layer_kernel<W, false>, layer_kernel<W, true>}) {
            const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Layout<W>::kBytes);
            if (e != cudaSuccess) return e;
        }
        auto kernel = state->trace != nullptr ? layer_kernel<W, true> : layer_kernel<W, false>;
        return bi::launch(kernel, dim3(sms), dim3(kThreads), Layout<W>::kBytes, stream, *weights, *state);
    });
}
