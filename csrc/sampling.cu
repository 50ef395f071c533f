// Next-token sampling on the device, step for step the algorithm of src/sampling.rs:
// greedy (argmax, lowest id on ties) or top-k -> softmax at temperature -> top-p -> a Philox
// draw of (seed, sequence, step). Two passes: each block of `chunk_kernel` sorts one slice of
// the vocabulary and keeps its best 64; `pick_kernel` merges the slices of a row and draws.
// Candidates are ordered by (logit descending, id ascending); NaN logits never win.
#include <climits>

#include "common.cuh"

namespace {

constexpr int kChunkSlots = 2048;  // a vocabulary slice, padded to a power of two for the sort
constexpr int kChunkThreads = 256;
constexpr int kPickThreads = 1024;
constexpr int kPickSlots = BI_SAMPLE_CHUNKS * BI_MAX_TOP_K;
static_assert((kPickSlots & (kPickSlots - 1)) == 0, "the merge sort needs a power-of-two size");
constexpr size_t kPickSmem = kPickSlots * (sizeof(float) + sizeof(int));  // 64 KiB: dynamic

__device__ __forceinline__ bool better(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }

__device__ __forceinline__ bool is_greedy(const bi_sampling_params &p) { return p.temperature == 0.0f || p.top_k <= 1; }

// Bitonic sort of n (a power of two) pairs in shared memory, best first.
__device__ void sort_best_first(float *values, int *ids, int n) {
    for (int k = 2; k <= n; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < n; i += blockDim.x) {
                const int other = i ^ j;
                if (other > i) {
                    const bool want_i_better = (i & k) == 0;
                    if (want_i_better != better(values[i], ids[i], values[other], ids[other])) {
                        const float v = values[i];
                        values[i] = values[other], values[other] = v;
                        const int id = ids[i];
                        ids[i] = ids[other], ids[other] = id;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// grid (batch, BI_SAMPLE_CHUNKS): the best BI_MAX_TOP_K of one vocabulary slice (greedy rows:
// only the best one, by a reduction).
__global__ void __launch_bounds__(kChunkThreads)
    chunk_kernel(float *__restrict__ cand_values, int32_t *__restrict__ cand_ids, const float *__restrict__ logits,
                 const int32_t *__restrict__ positions, const bi_sampling_params *__restrict__ params, int vocab) {
    const int row = blockIdx.x, chunk = blockIdx.y;
    bi::allow_next_kernel();
    bi::wait_for_previous_kernel();
    if (positions[row] < 0) return;
    const int chunk_len = (vocab + BI_SAMPLE_CHUNKS - 1) / BI_SAMPLE_CHUNKS;
    const int begin = chunk * chunk_len, end = min(vocab, begin + chunk_len);
    const float *src = logits + static_cast<size_t>(row) * vocab;
    float *out_values = cand_values + (static_cast<size_t>(row) * BI_SAMPLE_CHUNKS + chunk) * BI_MAX_TOP_K;
    int32_t *out_ids = cand_ids + (static_cast<size_t>(row) * BI_SAMPLE_CHUNKS + chunk) * BI_MAX_TOP_K;
    auto value_at = [&](int i) {
        const float v = i < end ? src[i] : -INFINITY;
        return isnan(v) ? -INFINITY : v;
    };

    if (is_greedy(params[row])) {
        float best = -INFINITY;
        int best_id = INT_MAX;
        for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
            const float v = value_at(i);
            if (better(v, i, best, best_id)) best = v, best_id = i;
        }
        for (int offset = bi::kWarp / 2; offset > 0; offset /= 2) {
            const float v = __shfl_xor_sync(0xffffffffu, best, offset);
            const int id = __shfl_xor_sync(0xffffffffu, best_id, offset);
            if (better(v, id, best, best_id)) best = v, best_id = id;
        }
        __shared__ float warp_best[kChunkThreads / bi::kWarp];
        __shared__ int warp_id[kChunkThreads / bi::kWarp];
        if (threadIdx.x % bi::kWarp == 0) warp_best[threadIdx.x / bi::kWarp] = best, warp_id[threadIdx.x / bi::kWarp] = best_id;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < kChunkThreads / bi::kWarp; ++w)
                if (better(warp_best[w], warp_id[w], best, best_id)) best = warp_best[w], best_id = warp_id[w];
            out_values[0] = best, out_ids[0] = best_id;
        }
        return;
    }

    __shared__ float values[kChunkSlots];
    __shared__ int ids[kChunkSlots];
    for (int i = threadIdx.x; i < kChunkSlots; i += blockDim.x) {
        values[i] = value_at(begin + i);
        ids[i] = begin + i < end ? begin + i : INT_MAX;
    }
    __syncthreads();
    sort_best_first(values, ids, kChunkSlots);
    for (int i = threadIdx.x; i < BI_MAX_TOP_K; i += blockDim.x) out_values[i] = values[i], out_ids[i] = ids[i];
}

__device__ uint32_t philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; ++round) {
        const uint64_t p0 = 0xD2511F53ull * c0, p1 = 0xCD9E8D57ull * c2;
        const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0, n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
        c1 = static_cast<uint32_t>(p1), c3 = static_cast<uint32_t>(p0), c0 = n0, c2 = n2;
        k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
    }
    return c0;
}

// grid (batch): merge the slices of a row, pick its token, advance its position and step.
__global__ void __launch_bounds__(kPickThreads)
    pick_kernel(int32_t *__restrict__ tokens, int32_t *__restrict__ positions, uint32_t *__restrict__ steps,
                const float *__restrict__ cand_values, const int32_t *__restrict__ cand_ids,
                const bi_sampling_params *__restrict__ params) {
    const int row = blockIdx.x;
    bi::allow_next_kernel();
    bi::wait_for_previous_kernel();
    if (positions[row] < 0) return;
    const bi_sampling_params p = params[row];
    const bool greedy = is_greedy(p);
    const int per_chunk = greedy ? 1 : min(p.top_k, BI_MAX_TOP_K);
    int n = 1;
    while (n < BI_SAMPLE_CHUNKS * per_chunk) n <<= 1;

    extern __shared__ float pick_smem[];  // kPickSmem bytes: values, then ids
    float *values = pick_smem;
    int *ids = reinterpret_cast<int *>(pick_smem + kPickSlots);
    const float *src_values = cand_values + static_cast<size_t>(row) * BI_SAMPLE_CHUNKS * BI_MAX_TOP_K;
    const int32_t *src_ids = cand_ids + static_cast<size_t>(row) * BI_SAMPLE_CHUNKS * BI_MAX_TOP_K;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int chunk = i / per_chunk, slot = i % per_chunk;
        const bool real = chunk < BI_SAMPLE_CHUNKS;
        values[i] = real ? src_values[chunk * BI_MAX_TOP_K + slot] : -INFINITY;
        ids[i] = real ? src_ids[chunk * BI_MAX_TOP_K + slot] : INT_MAX;
    }
    __syncthreads();
    sort_best_first(values, ids, n);
    if (threadIdx.x != 0) return;

    int token = ids[0];
    if (!greedy) {
        // Top-k, softmax at the temperature, top-p: the shortest prefix reaching top_p.
        float weights[BI_MAX_TOP_K];
        float total = 0.0f;
        for (int i = 0; i < per_chunk; ++i) total += weights[i] = expf((values[i] - values[0]) / p.temperature);
        float kept = 0.0f;
        int count = 0;
        while (count < per_chunk) {
            kept += weights[count++];
            if (kept >= p.top_p * total) break;
        }
        const uint32_t bits = philox4x32_10(steps[row], p.sequence, 0, 0, p.seed_lo, p.seed_hi);
        const float target = static_cast<float>(bits >> 8) * (1.0f / 16777216.0f) * kept;
        float cumulative = 0.0f;
        token = ids[count - 1];
        for (int i = 0; i < count; ++i) {
            cumulative += weights[i];
            if (target < cumulative) {
                token = ids[i];
                break;
            }
        }
    }
    tokens[row] = token;
    positions[row] += 1;
    steps[row] += 1;
}

}  // namespace

extern "C" cudaError_t bi_sample(int32_t *tokens, int32_t *positions, uint32_t *steps, float *cand_values,
                                 int32_t *cand_ids, const float *logits, const bi_sampling_params *params, int batch,
                                 int vocab, cudaStream_t stream) {
    if (batch <= 0 || vocab <= 0 || vocab > BI_SAMPLE_CHUNKS * kChunkSlots) return cudaErrorInvalidValue;
    cudaError_t e = bi::launch(chunk_kernel, dim3(batch, BI_SAMPLE_CHUNKS), dim3(kChunkThreads), 0, stream, cand_values,
                               cand_ids, logits, positions, params, vocab);
    if (e != cudaSuccess) return e;
    e = cudaFuncSetAttribute(pick_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kPickSmem));
    if (e != cudaSuccess) return e;
    return bi::launch(pick_kernel, dim3(batch), dim3(kPickThreads), kPickSmem, stream, tokens, positions, steps, cand_values,
                      cand_ids, params);
}
