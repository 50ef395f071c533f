//! The GPU engine: weights, paged KV cache and static buffers allocated once; prompts prefilled
//! in passes (those started together packed into shared ones: start.rs); the whole decode step (embedding, 28 layers, final norm, LM head, sampling, and
//! the sampled token fed back as the next input) captured into one CUDA graph and replayed.
//!
//! Everything that changes between steps lives on the device: the sampler writes the next
//! token and advances the position and step of each sequence, so a step needs no host input.
//! Per-sequence state set from the host (block tables, sampling parameters) is written when a
//! sequence starts. Slots without a sequence carry position -1 and are skipped by the kernels.

mod start;

use anyhow::{ensure, Context, Result};
use cudarc::driver::{sys, CudaGraph, CudaSlice};

use super::forward::{Forward, StepBuffers};
use super::kernels::{
    self, RowTiles, SampleState, SamplingParamsRaw, BLOCK_TOKENS, MAX_TOP_K, SAMPLE_CHUNKS,
};
use super::kv_cache::{bytes_per_position, KvCache};
use super::weights::DeviceWeights;
use super::Gpu;
use crate::config::ModelConfig;
use crate::quant::Quant;
use crate::sampling::SamplingParams;
use crate::weights::ModelWeights;

#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Sequences decoded together (the graph's batch).
    pub max_batch: usize,
    /// KV cache size; None: enough for `max_batch` full contexts, within 90% of free memory.
    pub kv_cache_bytes: Option<usize>,
    /// Rows per prefill pass: a long prompt takes several; prompts started together share them,
    /// back to back.
    pub prefill_chunk: usize,
    /// Weight format of the linear layers and the LM head.
    pub quant: Quant,
    /// A sequence's logits bit-identical whatever batch it is decoded in and whatever slot it
    /// holds: every batch runs the fused layer kernel on 16-row chunks with the same attention
    /// ranges, and the LM head on 16-row chunks (slower than the default above 16 sequences).
    /// Needs a GPU with the fused kernel's SMs.
    pub batch_invariant: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_batch: 1,
            kv_cache_bytes: None,
            prefill_chunk: 2048,
            quant: Quant::Bf16,
            batch_invariant: false,
        }
    }
}

/// Attention ranges per row for a decode batch: (row, kv head, range) work items fill the 132
/// SMs of an H100/H200 once; the kernels use fewer ranges where the context is short. A
/// batch-invariant engine uses one count for every batch (the ranges decide the order of the
/// softmax merge): INVARIANT_SPLITS, between batch 1's 16 and batch 16's 1 (a block runs its
/// items one after another, each a chain of memory round trips: 16 ranges per row cost
/// batch 16 2.5x its step time, measured on an H200).
fn decode_splits(batch: usize, batch_invariant: bool) -> usize {
    if batch_invariant {
        return INVARIANT_SPLITS;
    }
    (132 / (8 * batch)).clamp(1, kernels::MAX_SPLITS)
}

const INVARIANT_SPLITS: usize = 4;

/// The most independent chains of layer kernels a decode step runs in (see `Forward::chains`).
const MAX_CHAINS: usize = 4;

/// Rows per LM-head launch of a decode step: all of them, or for a batch-invariant engine the
/// most whose product keeps the per-row arithmetic of one row (the skinny kernel's limit).
fn lm_head_rows(rows: usize, batch_invariant: bool) -> usize {
    if batch_invariant {
        rows.min(kernels::SKINNY_ROWS)
    } else {
        rows
    }
}

/// Prompts whose last positions' logits one LM-head launch computes when sequences start
/// together: the skinny LM head's most rows, which stream the head's weights once.
const PROMPT_LOGITS_ROWS: usize = kernels::SKINNY_ROWS;

/// Batch sizes a decode step is captured for; a step runs the smallest that covers every live
/// slot, the rows past the live ones padding (position -1: no KV read or written).
pub const BUCKETS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

fn buckets(max_batch: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = BUCKETS.into_iter().filter(|&b| b < max_batch).collect();
    sizes.push(max_batch);
    sizes
}

pub struct Engine {
    forward: Forward, // the GPU, config, weights and block tables [max_batch, max_blocks]
    cache: KvCache,
    decode: StepBuffers,                  // rows = max_batch, row b = slot b
    prefill: StepBuffers,                 // rows = prefill_chunk
    prefill_tiles: RowTiles,              // the prefill attention's row tiles of a pass
    logits: CudaSlice<f32>,               // [max_batch, vocab]
    prompt_logits: CudaSlice<f32>,        // [min(PROMPT_LOGITS_ROWS, max_batch), vocab]
    params: CudaSlice<SamplingParamsRaw>, // [max_batch]
    steps: CudaSlice<u32>,                // [max_batch]
    cand_values: CudaSlice<f32>,          // [max_batch, 128, 64]
    cand_ids: CudaSlice<i32>,             // [max_batch, 128, 64]
    graphs: Vec<(usize, CudaGraph)>,      // (bucket, its captured step), ascending
    slots: Vec<Option<Vec<u32>>>,         // KV blocks held by each slot's sequence
    context_limit: usize,
}

impl Engine {
    pub fn new(
        gpu: Gpu,
        config: &ModelConfig,
        host_weights: &ModelWeights,
        options: &EngineOptions,
    ) -> Result<Self> {
        ensure!(
            options.max_batch >= 1 && options.prefill_chunk >= 1,
            "batch and prefill chunk must be positive"
        );
        let weights = DeviceWeights::upload(&gpu, config, host_weights, options.quant)
            .context("uploading the weights")?;
        let b = options.max_batch;
        let invariant = options.batch_invariant;
        // Partials for the bucket that needs the most (rows x ranges): a batch of 3 needs 15,
        // its bucket of 1 16.
        let splits = buckets(b)
            .into_iter()
            .map(|rows| (rows * decode_splits(rows, invariant)).div_ceil(b))
            .max()
            .unwrap_or(1);
        let decode = StepBuffers::new(&gpu, b, splits)?;
        let prefill = StepBuffers::new(&gpu, options.prefill_chunk, 1)?;
        let prefill_tiles = RowTiles::new(&gpu, options.prefill_chunk)?;
        let logits = gpu.alloc(b * config.vocab)?;
        let prompt_logits = gpu.alloc(PROMPT_LOGITS_ROWS.min(b) * config.vocab)?;
        let params = gpu.upload(&vec![
            kernels::sampling_params_raw(
                &SamplingParams::greedy(),
                0
            );
            b
        ])?;
        let steps = gpu.alloc(b)?;
        let cand_values = gpu.alloc(b * SAMPLE_CHUNKS * MAX_TOP_K)?;
        let cand_ids = gpu.alloc(b * SAMPLE_CHUNKS * MAX_TOP_K)?;

        let per_position = bytes_per_position(config.layers);
        let cache_bytes = match options.kv_cache_bytes {
            Some(bytes) => bytes,
            None => {
                let (free, _) = gpu.ctx.mem_get_info().context("reading free GPU memory")?;
                (b * config.max_positions * per_position).min(free / 10 * 9)
            }
        };
        let cache = KvCache::new(&gpu, config.layers, cache_bytes)?;
        let context_limit = config.max_positions.min(cache.blocks() * BLOCK_TOKENS);
        let max_blocks = context_limit.div_ceil(BLOCK_TOKENS);
        let block_tables = gpu.alloc(b * max_blocks)?;
        let fused_decode = gpu.multiprocessors()? >= kernels::FUSED_DECODE_MIN_SMS;
        ensure!(
            fused_decode || !invariant,
            "batch-invariant decode needs the fused layer kernel, which needs a GPU with at least {} SMs",
            kernels::FUSED_DECODE_MIN_SMS
        );
        let sides = (1..MAX_CHAINS)
            .map(|_| gpu.sibling())
            .collect::<Result<_>>()?;
        let forward = Forward {
            gpu,
            sides,
            config: config.clone(),
            weights,
            block_tables,
            max_blocks,
            fused_decode,
            knobs: kernels::LayerKnobs::default(),
            batch_invariant: invariant,
        };
        let mut engine = Self {
            forward,
            cache,
            decode,
            prefill,
            prefill_tiles,
            logits,
            prompt_logits,
            params,
            steps,
            cand_values,
            cand_ids,
            graphs: Vec::new(),
            slots: vec![None; b],
            context_limit,
        };
        let idle = vec![-1i32; b];
        engine
            .forward
            .gpu
            .write(&mut engine.decode.positions, &idle)?;
        let slot_rows: Vec<i32> = (0..b as i32).collect();
        engine
            .forward
            .gpu
            .write(&mut engine.decode.row_seq, &slot_rows)?;
        // Every kernel of every bucket once, with no live slot (nothing computed): modules load
        // lazily, which must not happen inside a capture.
        for bucket in buckets(b) {
            engine.run_rows(bucket)?;
        }
        engine.forward.gpu.synchronize()?;
        Ok(engine)
    }

    pub fn gpu(&self) -> &Gpu {
        &self.forward.gpu
    }

    /// Sequences decoded together at most (the slots).
    pub fn max_batch(&self) -> usize {
        self.slots.len()
    }

    /// Most positions (prompt + generated) one sequence can hold.
    pub fn context_limit(&self) -> usize {
        self.context_limit
    }

    /// Weight bytes one decode step streams.
    pub fn weight_bytes_per_step(&self) -> usize {
        self.forward.weights.step_bytes
    }

    /// Weight bytes on the device (the bf16 embedding included) and the seconds their upload and
    /// quantization took.
    pub fn weight_footprint(&self) -> (usize, f64) {
        let w = &self.forward.weights;
        (w.device_bytes, w.load_seconds)
    }

    /// Rows a step must cover: up to the last live slot (at least one).
    fn live_rows(&self) -> usize {
        self.slots
            .iter()
            .rposition(Option::is_some)
            .map_or(1, |last| last + 1)
    }

    /// The smallest captured batch size that covers `rows`.
    fn bucket(&self, rows: usize) -> usize {
        buckets(self.slots.len())
            .into_iter()
            .find(|&b| b >= rows)
            .unwrap_or(self.slots.len())
    }

    /// The decode step of the first `rows` slots, kernel by kernel.
    fn run_rows(&mut self, rows: usize) -> Result<()> {
        let v = self.forward.config.vocab;
        let invariant = self.forward.batch_invariant;
        self.forward.decode_layers(
            &mut self.decode,
            &mut self.cache,
            rows,
            decode_splits(rows, invariant),
        )?;
        let chunk = lm_head_rows(rows, invariant);
        for first in (0..rows).step_by(chunk) {
            let n = chunk.min(rows - first);
            self.forward.logits(
                &mut self.decode,
                first,
                n,
                &mut self.logits.slice_mut(first * v..(first + n) * v),
            )?;
        }
        let state = SampleState {
            tokens: &mut self.decode.tokens,
            positions: &mut self.decode.positions,
            steps: &mut self.steps,
        };
        kernels::sample(
            &self.forward.gpu,
            state,
            &mut self.cand_values,
            &mut self.cand_ids,
            &self.logits,
            &self.params,
            rows,
            v,
        )
    }

    /// One decode step for every live slot, launched kernel by kernel.
    pub fn step_eager(&mut self) -> Result<()> {
        self.run_rows(self.bucket(self.live_rows()))
    }

    /// Captures the decode step of every bucket into a CUDA graph; later `step` calls replay
    /// the one that covers the live slots. Returns the kernel-node count of each (bucket, nodes).
    pub fn capture(&mut self) -> Result<Vec<(usize, usize)>> {
        self.graphs.clear();
        let mut counts = Vec::new();
        for bucket in buckets(self.slots.len()) {
            let stream = &self.forward.gpu.stream;
            stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
            let captured = self.run_rows(bucket);
            let graph = self
                .forward
                .gpu
                .stream
                .end_capture(sys::CUgraphInstantiate_flags(0));
            captured.with_context(|| format!("capturing the decode step of batch {bucket}"))?;
            let graph = graph
                .context("instantiating the decode graph")?
                .context("the capture recorded nothing")?;
            counts.push((bucket, graph_node_count(&graph)?));
            self.graphs.push((bucket, graph));
        }
        Ok(counts)
    }

    /// One decode step of every live slot: the captured graph of its bucket if any, else kernel
    /// by kernel.
    pub fn step(&mut self) -> Result<()> {
        let bucket = self.bucket(self.live_rows());
        match self.graphs.iter().find(|(b, _)| *b == bucket) {
            Some((_, graph)) => graph.launch().context("launching the decode graph"),
            None => self.step_eager(),
        }
    }

    /// The batch size the next step runs (live slots rounded up to a bucket).
    pub fn step_rows(&self) -> usize {
        self.bucket(self.live_rows())
    }

    /// Benchmarks only: sets the fused layer kernel's timing knobs (which can make the results
    /// wrong) and captures the step again. Returns the graph's kernel-node count.
    pub fn set_layer_knobs(&mut self, knobs: kernels::LayerKnobs) -> Result<Vec<(usize, usize)>> {
        self.forward.knobs = knobs;
        self.capture()
    }

    /// Diagnostics: from now on every fused layer launch records its blocks' timelines (see
    /// `trace`), and the step is captured again.
    pub fn trace_layers(&mut self) -> Result<Vec<(usize, usize)>> {
        let sms = self.forward.gpu.multiprocessors()?;
        let len = self.forward.config.layers * sms * kernels::TRACE_EVENTS;
        self.decode.trace = Some(self.forward.gpu.alloc(len)?);
        self.capture()
    }

    /// The last step's timelines [layers, SMs, TRACE_EVENTS] in GPU-clock ns (empty unless
    /// `trace_layers` was called).
    pub fn trace(&self) -> Result<Vec<u64>> {
        match &self.decode.trace {
            Some(t) => self.forward.gpu.download(t),
            None => Ok(Vec::new()),
        }
    }

    /// The next input token of each slot (what the last step sampled) `[max_batch]`.
    pub fn tokens(&self) -> &CudaSlice<i32> {
        &self.decode.tokens
    }

    /// Overrides the next input tokens (teacher forcing).
    pub fn set_tokens(&mut self, tokens: &[i32]) -> Result<()> {
        self.forward.gpu.write(&mut self.decode.tokens, tokens)
    }

    /// Overrides the positions of the next input tokens (benchmarks hold the context fixed).
    pub fn set_positions(&mut self, positions: &[i32]) -> Result<()> {
        self.forward
            .gpu
            .write(&mut self.decode.positions, positions)
    }

    /// Logits of the last step [max_batch, vocab].
    pub fn logits(&self) -> &CudaSlice<f32> {
        &self.logits
    }
}

fn graph_node_count(graph: &CudaGraph) -> Result<usize> {
    let mut count = 0usize;
    // SAFETY: a null node array asks only for the count, written to `count`; the graph is live.
    let result =
        unsafe { sys::cuGraphGetNodes(graph.cu_graph(), std::ptr::null_mut(), &mut count) };
    ensure!(
        result == sys::CUresult::CUDA_SUCCESS,
        "cuGraphGetNodes: {result:?}"
    );
    Ok(count)
}
