//! One forward pass over `m` token rows, as a sequence of kernel launches on the stream: the
//! same code enqueues a prefill chunk (rows = prompt tokens) and a decode step (rows = one token
//! per sequence), and is what the CUDA graph captures.

use std::ops::Range;

use anyhow::Result;
use cudarc::driver::{CudaSlice, DevicePtrMut};

use super::kernels::{
    self, DecodeLayer, DecodeScratch, Epilogue, LayerCache, LayerKnobs, NormEpilogue, Placement,
    RowTiles, Rows, DECODE_LAYER_MAX_ROWS, HIDDEN, INTERMEDIATE, KV_HEADS, PARTIAL_FLOATS,
    QKV_WIDTH, Q_HEADS, Q_WIDTH,
};
use super::kv_cache::KvCache;
use super::weights::DeviceWeights;
use super::Gpu;
use crate::config::ModelConfig;

/// Device buffers for up to `rows` token rows. `tokens`, `positions` and `row_seq` are inputs
/// written before a launch (or by the device sampler); the rest is scratch.
pub struct StepBuffers {
    pub rows: usize,
    pub splits: usize, // attention ranges per row the partials hold (rows x splits in all)
    pub tokens: CudaSlice<i32>, // [rows]
    pub positions: CudaSlice<i32>, // [rows]; negative: a padding row
    pub row_seq: CudaSlice<i32>, // [rows]: the block-table row of each token
    x: CudaSlice<f32>, // [rows, 1024] residual stream
    h: CudaSlice<u16>, // [rows, 1024] normalized activations (large m only)
    qkv: CudaSlice<f32>, // [rows, 4096]
    q: CudaSlice<u16>, // [rows, 16, 128]
    attn: CudaSlice<u16>, // [rows, 2048]
    act: CudaSlice<u16>, // [rows, 3072] SwiGLU output
    partials: CudaSlice<f32>, // [rows, 16, splits, 130]
    counters: CudaSlice<i32>, // [rows, 8] attention completion counters, kept zero
    arrivals: CudaSlice<u64>, // [1 + 8] fused layer kernel: grid-barrier arrivals, kv heads done
    /// None, or [layers, SMs, TRACE_EVENTS]: the fused layer launches' timelines.
    pub trace: Option<CudaSlice<u64>>,
}

impl StepBuffers {
    pub fn new(gpu: &Gpu, rows: usize, splits: usize) -> Result<Self> {
        Ok(Self {
            rows,
            splits,
            tokens: gpu.alloc(rows)?,
            positions: gpu.alloc(rows)?,
            row_seq: gpu.alloc(rows)?,
            x: gpu.alloc(rows * HIDDEN)?,
            h: gpu.alloc(rows * HIDDEN)?,
            qkv: gpu.alloc(rows * QKV_WIDTH)?,
            q: gpu.alloc(rows * Q_WIDTH)?,
            attn: gpu.alloc(rows * Q_WIDTH)?,
            act: gpu.alloc(rows * INTERMEDIATE)?,
            partials: gpu.alloc(rows * Q_HEADS * splits * PARTIAL_FLOATS)?,
            counters: gpu.alloc(rows * KV_HEADS)?,
            arrivals: gpu.alloc(1 + KV_HEADS)?,
            trace: None,
        })
    }
}

/// What the rows of a forward pass are: a prompt's tokens (a row attends to the rows before it,
/// so every row's K/V is in the cache before attention), or one token per sequence (attention
/// may then prepare each row's query and write its K/V itself: `FOLDED_ATTENTION_MAX_ROWS`),
/// alone or in one of concurrent chains of rows (`chained_layers`).
#[derive(Clone, Copy)]
enum Tokens<'a> {
    /// The row tiles of the prefill attention, one sequence's rows each.
    Prefill(&'a RowTiles),
    Decode(Placement),
}

impl Tokens<'_> {
    fn placement(self) -> Placement {
        match self {
            Tokens::Prefill(_) => Placement::Alone,
            Tokens::Decode(placement) => placement,
        }
    }
}

/// Decode chains of up to this many rows run q/k norm + RoPE inside attention, one launch fewer
/// per layer (batch 32, two chains of 16: 18,383 -> 18,754 tok/s); longer chains keep the
/// separate kernel, as the folded work lengthens every attention block's chain of memory round
/// trips (always folded, batch 64 / 128 / 256: 26,394 -> 26,372, 37,064 -> 35,840, 44,754 ->
/// 41,739 tok/s; context 512, H200).
const FOLDED_ATTENTION_MAX_ROWS: usize = 16;

/// What a forward pass reads besides its own buffers and the KV cache.
pub struct Forward {
    pub gpu: Gpu,
    /// Sibling streams for the chains of a many-row decode step (`chained_layers`).
    pub sides: Vec<Gpu>,
    pub config: ModelConfig,
    pub weights: DeviceWeights,
    pub block_tables: CudaSlice<i32>, // [sequences, max_blocks]
    pub max_blocks: usize,
    /// Whether the GPU has the SMs for the fused decode-layer kernel's grid.
    pub fused_decode: bool,
    /// Timing knobs of the fused layer kernel (benchmarks only).
    pub knobs: LayerKnobs,
    /// Decode every batch with the per-row arithmetic of one 16-row fused launch (see
    /// `decode_layers`); needs `fused_decode`.
    pub batch_invariant: bool,
}

impl Forward {
    /// The embedding of the first `m` rows' tokens into the residual stream `bufs.x`.
    fn embed(&self, bufs: &mut StepBuffers, m: usize) -> Result<()> {
        anyhow::ensure!(m <= bufs.rows, "{m} rows for buffers of {}", bufs.rows);
        let (c, w) = (&self.config, &self.weights);
        kernels::embedding(
            &self.gpu,
            &mut bufs.x,
            &w.embed,
            &bufs.tokens,
            m,
            HIDDEN,
            c.vocab,
        )
    }

    /// A decode step's embedding and layers for `m` rows (one per sequence): one fused kernel
    /// per layer for up to 16 rows; beyond (and on GPUs with too few SMs for the fused kernel's
    /// grid) the separate kernels, in concurrent chains of rows (`chains`); with
    /// `batch_invariant`, the fused kernel on every 16-row chunk instead, so that each row's
    /// arithmetic never depends on m.
    pub fn decode_layers(
        &self,
        bufs: &mut StepBuffers,
        cache: &mut KvCache,
        m: usize,
        splits: usize,
    ) -> Result<()> {
        anyhow::ensure!(
            m * splits <= bufs.rows * bufs.splits,
            "{m} rows of {splits} attention ranges overflow the partials"
        );
        self.embed(bufs, m)?;
        if !self.fused_decode || (m > DECODE_LAYER_MAX_ROWS && !self.batch_invariant) {
            return self.chained_layers(bufs, cache, m, splits, self.chains(m));
        }
        let (gpu, c, w) = (&self.gpu, &self.config, &self.weights);
        let tables = self.block_tables.slice(..);
        let partials = Q_HEADS * splits * PARTIAL_FLOATS; // per row
        for (i, layer) in w.layers.iter().enumerate() {
            let weights = DecodeLayer {
                input_norm: &layer.input_norm,
                qkv: layer.qkv.view(),
                q_norm: &layer.q_norm,
                k_norm: &layer.k_norm,
                o: layer.o.view(),
                post_norm: &layer.post_norm,
                gate_up: layer.gate_up.view(),
                down: layer.down.view(),
            };
            for first in (0..m).step_by(DECODE_LAYER_MAX_ROWS) {
                let n = (m - first).min(DECODE_LAYER_MAX_ROWS);
                let (positions, row_seq) = (
                    bufs.positions.slice(first..first + n),
                    bufs.row_seq.slice(first..first + n),
                );
                let rows = Rows {
                    positions: &positions,
                    row_seq: &row_seq,
                    block_tables: &tables,
                    max_blocks: self.max_blocks,
                    m: n,
                };
                let chunk = |width: usize| first * width..(first + n) * width;
                let scratch = DecodeScratch {
                    x: bufs.x.slice_mut(chunk(HIDDEN)),
                    qkv: bufs.qkv.slice_mut(chunk(QKV_WIDTH)),
                    attn: bufs.attn.slice_mut(chunk(Q_WIDTH)),
                    act: bufs.act.slice_mut(chunk(INTERMEDIATE)),
                    partials: bufs.partials.slice_mut(chunk(partials)),
                    counters: bufs.counters.slice_mut(chunk(KV_HEADS)),
                    arrivals: &mut bufs.arrivals,
                };
                let (mut k, mut v) = cache.layer_mut(i);
                let layer_cache = LayerCache {
                    k: &mut k,
                    v: &mut v,
                };
                // The timeline of the first chunk only.
                let trace = bufs.trace.as_mut().filter(|_| first == 0).map(|t| {
                    let per_layer = t.len() / w.layers.len();
                    t.slice_mut(i * per_layer..(i + 1) * per_layer)
                });
                kernels::decode_layer(
                    gpu,
                    &weights,
                    layer_cache,
                    scratch,
                    &rows,
                    &w.rope_inv_freq,
                    splits,
                    c.rms_eps,
                    self.knobs,
                    trace,
                )?;
            }
        }
        Ok(())
    }

    /// Independent chains of layer kernels a decode step of `m` rows runs in: one fused chain
    /// up to 16 rows, two chains up to CHAIN_ROWS, then one chain per CHAIN_ROWS rows (at most
    /// `sides` + 1). Measured (context 512, H200): at 32 rows two chains of 16 reached 18,357
    /// tok/s against one chain's 16,896; at 64 rows two chains of 32 with tiled products
    /// (`Placement`) 27,920 against one chain's 27,221 (with skinny products, in an earlier
    /// build, 20,349 against 26,458); at 128 rows four chains of 32 36,690 against two of 64's
    /// 38,807, three chains 38,273 against 39,139, one chain 32,846 / 32,887 against two's
    /// 38,957 / 39,102; at 256, four chains 44,452 against two's 41,983 (at 59786ab, two
    /// repeats: 46,634 / 46,581 against 44,623 / 44,703), three 44,076 against four's 46,691.
    fn chains(&self, m: usize) -> usize {
        const CHAIN_ROWS: usize = 64;
        let chains = if m <= DECODE_LAYER_MAX_ROWS {
            1
        } else if m <= CHAIN_ROWS {
            2
        } else {
            m / CHAIN_ROWS
        };
        chains.clamp(1, self.sides.len() + 1)
    }

    /// Every layer for `m` rows as `chains` independent chains of kernels over equal row ranges:
    /// the first on the main stream, the others on sibling streams forked from it and joined
    /// back, so that one chain's latency-bound products run beside another's bandwidth-bound
    /// attention.
    fn chained_layers(
        &self,
        bufs: &mut StepBuffers,
        cache: &mut KvCache,
        m: usize,
        splits: usize,
        chains: usize,
    ) -> Result<()> {
        let per_chain = m.div_ceil(chains);
        let sides = &self.sides[..chains - 1];
        let tokens = Tokens::Decode(if chains > 1 {
            Placement::BesideChain
        } else {
            Placement::Alone
        });
        for (i, side) in sides.iter().enumerate() {
            let rows = (i + 1) * per_chain..((i + 2) * per_chain).min(m);
            side.stream.join(&self.gpu.stream)?;
            self.layer_rows(side, bufs, cache, rows, splits, tokens)?;
        }
        self.layer_rows(&self.gpu, bufs, cache, 0..per_chain, splits, tokens)?;
        for side in sides {
            self.gpu.stream.join(&side.stream)?;
        }
        Ok(())
    }

    /// Embedding and every layer for the first `m` rows, kernel by kernel: prompt tokens, whose
    /// rows `tiles` cut into the prefill attention's tiles of one sequence each. K/V of the rows
    /// go into `cache`, and `bufs.x` ends holding the final residual stream.
    pub fn prefill_layers(
        &self,
        bufs: &mut StepBuffers,
        cache: &mut KvCache,
        m: usize,
        tiles: &RowTiles,
    ) -> Result<()> {
        self.embed(bufs, m)?;
        self.layer_rows(&self.gpu, bufs, cache, 0..m, 1, Tokens::Prefill(tiles))
    }

    /// Every layer for `rows` of the buffers, kernel by kernel on `gpu`'s stream.
    fn layer_rows(
        &self,
        gpu: &Gpu,
        bufs: &mut StepBuffers,
        cache: &mut KvCache,
        rows: Range<usize>,
        splits: usize,
        tokens: Tokens,
    ) -> Result<()> {
        let (c, w) = (&self.config, &self.weights);
        let (first, m) = (rows.start, rows.len());
        anyhow::ensure!(
            rows.end * splits <= bufs.rows * bufs.splits,
            "rows {rows:?} of {splits} attention ranges overflow buffers of {} rows",
            bufs.rows
        );
        let chunk = |width: usize| first * width..(first + m) * width;
        let (positions, row_seq) = (bufs.positions.slice(rows.clone()), bufs.row_seq.slice(rows));
        let tables = self.block_tables.slice(..);
        let rows = Rows {
            positions: &positions,
            row_seq: &row_seq,
            block_tables: &tables,
            max_blocks: self.max_blocks,
            m,
        };
        let mut x = bufs.x.slice_mut(chunk(HIDDEN));
        let mut h = bufs.h.slice_mut(chunk(HIDDEN));
        let mut qkv = bufs.qkv.slice_mut(chunk(QKV_WIDTH));
        let mut q = bufs.q.slice_mut(chunk(Q_WIDTH));
        let mut attn = bufs.attn.slice_mut(chunk(Q_WIDTH));
        let mut act = bufs.act.slice_mut(chunk(INTERMEDIATE));
        let mut partials = bufs
            .partials
            .slice_mut(chunk(Q_HEADS * splits * PARTIAL_FLOATS));
        let mut counters = bufs.counters.slice_mut(chunk(KV_HEADS));
        for (i, layer) in w.layers.iter().enumerate() {
            kernels::norm_linear(
                gpu,
                &mut qkv,
                &x,
                &layer.input_norm,
                c.rms_eps,
                layer.qkv.view(),
                &mut h,
                (m, QKV_WIDTH, HIDDEN),
                NormEpilogue::Store,
                tokens.placement(),
            )?;
            let (mut k, mut v) = cache.layer_mut(i);
            let layer_cache = LayerCache {
                k: &mut k,
                v: &mut v,
            };
            match tokens {
                Tokens::Decode(_) if m <= FOLDED_ATTENTION_MAX_ROWS => kernels::decode_attention(
                    gpu,
                    &mut attn,
                    &mut partials,
                    &mut counters,
                    layer_cache,
                    &qkv,
                    &layer.q_norm,
                    &layer.k_norm,
                    &w.rope_inv_freq,
                    &rows,
                    splits,
                    c.rms_eps,
                )?,
                _ => {
                    kernels::qk_norm_rope_cache(
                        gpu,
                        &mut q,
                        layer_cache,
                        &qkv,
                        &layer.q_norm,
                        &layer.k_norm,
                        &w.rope_inv_freq,
                        &rows,
                        c.rms_eps,
                    )?;
                    if let Tokens::Prefill(tiles) = tokens {
                        kernels::prefill_attention(gpu, &mut attn, &q, &k, &v, &rows, tiles)?;
                    } else {
                        kernels::attention(
                            gpu,
                            &mut attn,
                            &mut partials,
                            &mut counters,
                            &q,
                            &k,
                            &v,
                            &rows,
                            splits,
                        )?;
                    }
                }
            }
            kernels::linear(
                gpu,
                &mut x,
                &attn,
                layer.o.view(),
                (m, HIDDEN, Q_WIDTH),
                Epilogue::AddResidual,
                tokens.placement(),
            )?;
            kernels::norm_linear(
                gpu,
                &mut act,
                &x,
                &layer.post_norm,
                c.rms_eps,
                layer.gate_up.view(),
                &mut h,
                (m, 2 * INTERMEDIATE, HIDDEN),
                NormEpilogue::SwiGlu,
                tokens.placement(),
            )?;
            kernels::linear(
                gpu,
                &mut x,
                &act,
                layer.down.view(),
                (m, HIDDEN, INTERMEDIATE),
                Epilogue::AddResidual,
                tokens.placement(),
            )?;
        }
        Ok(())
    }

    /// Copies rows `rows` of `from`'s residual stream into rows 0.. of `to`'s (the LM head then
    /// runs over the last rows of several prompts at once).
    pub fn gather_rows(
        &self,
        from: &StepBuffers,
        rows: &[usize],
        to: &mut StepBuffers,
    ) -> Result<()> {
        anyhow::ensure!(
            rows.len() <= to.rows,
            "{} rows for buffers of {}",
            rows.len(),
            to.rows
        );
        for (i, &row) in rows.iter().enumerate() {
            anyhow::ensure!(row < from.rows, "row {row} of buffers of {}", from.rows);
            self.gpu.stream.memcpy_dtod(
                &from.x.slice(row * HIDDEN..(row + 1) * HIDDEN),
                &mut to.x.slice_mut(i * HIDDEN..(i + 1) * HIDDEN),
            )?;
        }
        Ok(())
    }

    /// Final norm and LM head for rows `first..first + m` of `bufs.x` into logits [m, vocab].
    pub fn logits(
        &self,
        bufs: &mut StepBuffers,
        first: usize,
        m: usize,
        logits: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (gpu, c, w) = (&self.gpu, &self.config, &self.weights);
        let x_rows = bufs.x.slice(first * HIDDEN..(first + m) * HIDDEN);
        kernels::norm_linear(
            gpu,
            logits,
            &x_rows,
            &w.final_norm,
            c.rms_eps,
            w.lm_head(),
            &mut bufs.h,
            (m, c.vocab, HIDDEN),
            NormEpilogue::Store,
            Placement::Alone,
        )
    }
}
