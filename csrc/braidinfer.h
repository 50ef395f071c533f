/* braidinfer: the one C header between the CUDA C++ kernels and the Rust host runtime.
 *
 * Every entry point is `cudaError_t bi_<op>(outputs..., inputs..., dims..., stream)`: it launches
 * on the given stream (never the legacy null stream), never exits, and returns the launch error.
 * Tensors are row-major; shapes are in the comments. bf16 values cross the ABI as raw uint16_t
 * bits (`bi_bf16`). The residual stream is f32.
 */
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef uint16_t bi_bf16;

/* Human-readable text of a CUDA error code (static storage). */
const char *bi_error_string(cudaError_t error);

/* x[m, :] = f32(table[tokens[m], :]); tokens outside [0, vocab) write zeros.
 * x: [m, hidden] f32; table: [vocab, hidden] bf16; tokens: [m] int32. */
cudaError_t bi_embedding(float *x, const bi_bf16 *table, const int32_t *tokens, int m,
                         int hidden, int vocab, cudaStream_t stream);

/* out[r, :] = bf16(x[r, :] / rms(x[r, :]) * weight), rms = sqrt(mean(x^2) + eps), f32 math.
 * out: [m, hidden] bf16; x: [m, hidden] f32; weight: [hidden] bf16. */
cudaError_t bi_rmsnorm(bi_bf16 *out, const float *x, const bi_bf16 *weight, int m, int hidden,
                       float eps, cudaStream_t stream);

/* ---- Qwen3-0.6B dimensions the layer kernels are built for (the host checks the config). ---- */
#define BI_HIDDEN 1024
#define BI_Q_HEADS 16
#define BI_KV_HEADS 8
#define BI_HEAD_DIM 128
#define BI_INTERMEDIATE 3072
/* Tokens per KV-cache block (page). */
#define BI_BLOCK_TOKENS 16
/* Most ranges one attention row is split into. */
#define BI_MAX_SPLITS 32
/* Floats per attention partial: running max, running sum, 128 accumulators. */
#define BI_PARTIAL_FLOATS (BI_HEAD_DIM + 2)
/* Most candidates per sequence the sampler keeps (the top-k limit). */
#define BI_MAX_TOP_K 64
/* Vocabulary chunks the sampler's first pass splits each row into. */
#define BI_SAMPLE_CHUNKS 128

typedef enum {
    BI_EPILOGUE_STORE_F32 = 0,    /* out f32 [m, n] = acc */
    BI_EPILOGUE_ADD_RESIDUAL = 1, /* out f32 [m, n] += acc (the residual stream) */
    BI_EPILOGUE_SWIGLU = 2,       /* out bf16 [m, n/2]: silu(acc[:, 2i]) * acc[:, 2i+1] (w rows interleave gate/up) */
} bi_epilogue;

/* A weight matrix [n, k]: bf16 values, or (scales not NULL) INT8 values with one f32 scale per
 * row, row r standing for values[r, :] * scales[r]. Products read INT8 rows, convert them to
 * bf16 exactly in registers, accumulate in f32 and scale the row's sum. */
typedef struct {
    const void *values;  /* [n, k] bf16 or int8 */
    const float *scales; /* NULL (bf16), or [n] */
} bi_matrix;

/* values[r, :] = clamp(round(w[r, :] / scales[r]), -127, 127), scales[r] = absmax(w[r, :]) / 127
 * (f32, IEEE division, round half away from zero: bit-identical to src/quant.rs); a zero row gets
 * scale 0 and zero values. values: [n, k] int8; scales: [n] f32; w: [n, k] bf16. */
cudaError_t bi_quantize_int8(int8_t *values, float *scales, const bi_bf16 *w, int n, int k,
                             cudaStream_t stream);

/* Products of up to this many rows stream the weights straight into mma fragments (skinny, the
 * per-row arithmetic independent of m); the layer products up to twice as many rows too when
 * they run alone (bi_placement), larger ones run tiled. */
#define BI_SKINNY_ROWS 16

/* What else runs while a product does, which decides the kernel of a layer product (n <= 8192)
 * of BI_SKINNY_ROWS + 1 to 2 * BI_SKINNY_ROWS rows: alone, the skinny kernel with its RMSNorm
 * fused is the faster; beside another chain of rows' kernels (a decode step's concurrent
 * chains), the tiled one (batch 64 at context 512, H200: one chain of 64 rows 27,221 tok/s, two
 * chains of 32 with tiled products 27,920 in the same run; with skinny ones, in an earlier build,
 * 20,349 against one chain's 26,458). */
typedef enum {
    BI_PLACEMENT_ALONE = 0,
    BI_PLACEMENT_BESIDE_CHAIN = 1,
} bi_placement;

/* out = a . w^T on tensor cores with f32 accumulation, then the epilogue.
 * a: [m, k] bf16; w: [n, k]. n must be a multiple of 16 and k of 64; a skinny product (m <=
 * BI_SKINNY_ROWS, or up to twice that alone with n <= 8192) needs k a multiple of 512 (of 256
 * when n > 8192), twice that with INT8 weights. */
cudaError_t bi_linear(void *out, const bi_bf16 *a, bi_matrix w, int m, int n, int k,
                      bi_epilogue epilogue, bi_placement placement, cudaStream_t stream);

/* The same with RMSNorm fused in front: a = bf16(x / rms(x) * norm), x: [m, k] f32 (the
 * residual stream), norm: [k] bf16. scratch: [m, k] bf16, used when the product runs tiled. */
cudaError_t bi_norm_linear(void *out, const float *x, const bi_bf16 *norm, float eps, bi_matrix w,
                           bi_bf16 *scratch, int m, int n, int k, bi_epilogue epilogue,
                           bi_placement placement, cudaStream_t stream);

/* Per row r (a token at position positions[r] of sequence row_seq[r]; rows with a negative
 * position are padding and are skipped):
 *   q[r, h]   = bf16(rope(rmsnorm(qkv_q[r, h]) * q_norm)),  h < 16
 *   k, v      = bf16(rope(rmsnorm(qkv_k[r, j]) * k_norm)), bf16(qkv_v[r, j]),  j < 8, written to
 *               the paged cache at block block_tables[row_seq[r], pos / 16], slot pos % 16.
 * qkv: [m, 4096] f32 (q 2048 | k 1024 | v 1024); q: [m, 16, 128] bf16; rope_inv_freq: [64] f32;
 * k_cache, v_cache: [blocks, 8, 16, 128] bf16 (one layer); block_tables: [seqs, max_blocks]. */
cudaError_t bi_qk_norm_rope_cache(bi_bf16 *q, bi_bf16 *k_cache, bi_bf16 *v_cache, const float *qkv,
                                  const bi_bf16 *q_norm, const bi_bf16 *k_norm,
                                  const float *rope_inv_freq, const int32_t *positions,
                                  const int32_t *row_seq, const int32_t *block_tables, int m,
                                  int max_blocks, float eps, cudaStream_t stream);

/* Causal GQA attention over the paged cache: row r attends to positions 0..positions[r] of
 * sequence row_seq[r]; query head h reads kv head h / 2; scale 1/sqrt(128). The positions are
 * split into up to `splits` (<= BI_MAX_SPLITS) ranges of at least 64 positions, handled by
 * separate blocks, then combined (flash-decoding).
 * out: [m, 16 * 128] bf16; partials: [m, 16, splits, BI_PARTIAL_FLOATS] f32 workspace;
 * counters: [m, 8] int32 workspace, zero before the first call and left zero after each;
 * q: [m, 16, 128] bf16. Padding rows (negative position) write zeros. */
cudaError_t bi_attention(bi_bf16 *out, float *partials, int32_t *counters, const bi_bf16 *q, const bi_bf16 *k_cache,
                         const bi_bf16 *v_cache, const int32_t *positions, const int32_t *row_seq,
                         const int32_t *block_tables, int m, int max_blocks, int splits,
                         cudaStream_t stream);

/* Most rows of one tile of bi_prefill_attention. */
#define BI_PREFILL_TILE_ROWS 64

/* bi_attention for prompt rows (prefill), over `tiles` row tiles: tile t is rows
 * [row_tiles[2t], row_tiles[2t] + row_tiles[2t + 1]), 1 to BI_PREFILL_TILE_ROWS rows of one
 * sequence, row_seq[row_tiles[2t]] (the tile's other entries are not read); rows with negative
 * positions are padding (zeros out). A tile's rows share each K/V tile (flash attention), so a
 * prompt's K/V is read once per tile instead of once per row. Arguments otherwise as
 * bi_attention's, without the workspaces and splits. */
cudaError_t bi_prefill_attention(bi_bf16 *out, const bi_bf16 *q, const bi_bf16 *k_cache, const bi_bf16 *v_cache,
                                 const int32_t *positions, const int32_t *row_seq, const int32_t *block_tables,
                                 const int32_t *row_tiles, int tiles, int max_blocks, cudaStream_t stream);

/* Decode attention with bi_qk_norm_rope_cache's work folded in: every row is a different
 * sequence's next token, so each (row, kv head) prepares its query heads from qkv itself, and
 * the range that ends at the row's position writes the row's new K and V into the cache (no
 * other row reads them). Arguments as bi_qk_norm_rope_cache's and bi_attention's; the same
 * attention output, without q. */
cudaError_t bi_decode_attention(bi_bf16 *out, float *partials, int32_t *counters, bi_bf16 *k_cache,
                                bi_bf16 *v_cache, const float *qkv, const bi_bf16 *q_norm,
                                const bi_bf16 *k_norm, const float *rope_inv_freq,
                                const int32_t *positions, const int32_t *row_seq,
                                const int32_t *block_tables, int m, int max_blocks, int splits,
                                float eps, cudaStream_t stream);

/* One decoder layer's weights for bi_decode_layer (Qwen3-0.6B shapes; the four matrices all
 * bf16 or all INT8). */
typedef struct {
    const bi_bf16 *input_norm; /* [1024] */
    bi_matrix qkv;             /* [4096, 1024]: q 2048 rows | k 1024 | v 1024 */
    const bi_bf16 *q_norm;     /* [128] */
    const bi_bf16 *k_norm;     /* [128] */
    bi_matrix o;               /* [1024, 2048] */
    const bi_bf16 *post_norm;  /* [1024] */
    bi_matrix gate_up;         /* [6144, 1024], gate and up rows interleaved */
    bi_matrix down;            /* [1024, 3072] */
    bi_bf16 *k_cache;          /* [blocks, 8, 16, 128]: this layer's */
    bi_bf16 *v_cache;
} bi_layer_weights;

/* The decode step's state for bi_decode_layer. */
typedef struct {
    float *x;                     /* [m, 1024] residual stream, updated */
    float *qkv;                   /* [m, 4096] scratch */
    bi_bf16 *attn;                /* [m, 2048] scratch */
    bi_bf16 *act;                 /* [m, 3072] scratch */
    float *partials;              /* [m, 16, splits, BI_PARTIAL_FLOATS] scratch */
    int32_t *counters;            /* [m, 8]: zero before the first launch, left zero */
    unsigned long long *arrivals; /* [1 + 8]: grid-barrier arrivals, then per kv head the qkv blocks
                                     done with it; zero before the first launch, they only grow */
    const int32_t *positions;     /* [m]; negative: a padding row */
    const int32_t *row_seq;       /* [m] */
    const int32_t *block_tables;  /* [seqs, max_blocks] */
    const float *rope_inv_freq;   /* [64] */
    int m;                        /* rows, at most 16 */
    int max_blocks;
    int splits;                   /* attention ranges per row, at most BI_MAX_SPLITS */
    float eps;
    uint32_t skip_phases;         /* 0, or for timing only a mask of bi_layer_phase (results are then wrong) */
    uint32_t copy_window;         /* weight bytes in flight per block; 0: the kernel's default */
    unsigned long long *trace;    /* NULL, or [grid, BI_TRACE_EVENTS]: each block's timeline (below) */
} bi_layer_state;

/* A traced launch records, per block, the GPU clock (%globaltimer, ns) at its start, once the
 * previous kernel is done, then for qkv: A operand loaded, tiles multiplied, results stored
 * (and the kv heads signalled); the first attention item's kv head ready; attention done;
 * barrier; then for o, gate/up and down each: A loaded, tiles multiplied, stored, and a barrier
 * between them (19 stamps). */
#define BI_TRACE_EVENTS 19

/* Phases of bi_decode_layer a timing run may leave out, to see what each costs. */
typedef enum {
    BI_SKIP_QKV = 1,       /* the qkv product and its weight copies */
    BI_SKIP_ATTENTION = 2, /* q/k norm, RoPE, the KV write and attention */
    BI_SKIP_O = 4,
    BI_SKIP_GATE_UP = 8,
    BI_SKIP_DOWN = 16,
    BI_SKIP_BARRIERS = 32, /* the grid-wide barriers and the wait for the qkv blocks of a kv head */
} bi_layer_phase;

/* The fewest SMs bi_decode_layer runs on (its grid is one block per SM). */
#define BI_FUSED_DECODE_MIN_SMS 128

/* One whole decoder layer for m <= 16 decode rows in one launch: the same arithmetic as
 * bi_norm_linear (qkv), bi_qk_norm_rope_cache, bi_attention, bi_linear (o, residual),
 * bi_norm_linear (gate/up, SwiGLU) and bi_linear (down, residual) in sequence, on a persistent
 * grid of one block per SM (attention of a kv head waits for its qkv blocks; grid-wide barriers
 * before o, gate/up and down). */
cudaError_t bi_decode_layer(const bi_layer_weights *weights, const bi_layer_state *state, cudaStream_t stream);

/* Sampling parameters of one sequence (temperature 0 or top_k 1: greedy). */
typedef struct {
    float temperature;
    int32_t top_k;
    float top_p;
    uint32_t seed_lo;
    uint32_t seed_hi;
    uint32_t sequence; /* Philox counter word: which request this is */
} bi_sampling_params;

/* Picks the next token of each row b < batch from logits[b, :vocab] exactly as
 * src/sampling.rs does (top-k, softmax at temperature, top-p, Philox draw of
 * (seed, sequence, steps[b])). Rows whose positions[b] is negative are padding and are skipped.
 * Otherwise writes tokens[b], and advances positions[b] and steps[b] by one, so that the next
 * decode step reads its input from the device. cand_values / cand_ids: [batch,
 * BI_SAMPLE_CHUNKS, BI_MAX_TOP_K] workspace. logits: [batch, vocab] f32; vocab at most
 * BI_SAMPLE_CHUNKS * 2048. */
cudaError_t bi_sample(int32_t *tokens, int32_t *positions, uint32_t *steps, float *cand_values,
                      int32_t *cand_ids, const float *logits, const bi_sampling_params *params,
                      int batch, int vocab, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
