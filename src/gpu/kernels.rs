//! Safe wrappers of the csrc kernels: each checks buffer lengths against the dims it passes,
//! then makes the one FFI call. Buffers are anything cudarc can point at (slices and views);
//! bf16 buffers hold raw bits (`u16`).

use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice};

use super::device::{check, Gpu};
use super::ffi;

pub use ffi::bi_sampling_params as SamplingParamsRaw;

/// The device's form of sampling parameters for the request `sequence` (its Philox stream).
pub fn sampling_params_raw(
    params: &crate::sampling::SamplingParams,
    sequence: u32,
) -> SamplingParamsRaw {
    SamplingParamsRaw {
        temperature: params.temperature,
        top_k: params.top_k as i32,
        top_p: params.top_p,
        seed_lo: params.seed as u32,
        seed_hi: (params.seed >> 32) as u32,
        sequence,
    }
}

/// Model dimensions the layer kernels are compiled for.
pub const HIDDEN: usize = ffi::BI_HIDDEN as usize;
pub const Q_HEADS: usize = ffi::BI_Q_HEADS as usize;
pub const KV_HEADS: usize = ffi::BI_KV_HEADS as usize;
pub const HEAD_DIM: usize = ffi::BI_HEAD_DIM as usize;
pub const INTERMEDIATE: usize = ffi::BI_INTERMEDIATE as usize;
pub const BLOCK_TOKENS: usize = ffi::BI_BLOCK_TOKENS as usize;
pub const PARTIAL_FLOATS: usize = ffi::BI_PARTIAL_FLOATS as usize;
pub const MAX_SPLITS: usize = ffi::BI_MAX_SPLITS as usize;
pub const FUSED_DECODE_MIN_SMS: usize = ffi::BI_FUSED_DECODE_MIN_SMS as usize;
/// Products of up to this many rows run skinny, their per-row arithmetic independent of m (the
/// layer products up to twice as many when alone: `Placement`); larger ones tiled.
pub const SKINNY_ROWS: usize = ffi::BI_SKINNY_ROWS as usize;
pub const PREFILL_TILE_ROWS: usize = ffi::BI_PREFILL_TILE_ROWS as usize;
pub const SAMPLE_CHUNKS: usize = ffi::BI_SAMPLE_CHUNKS as usize;
pub const MAX_TOP_K: usize = ffi::BI_MAX_TOP_K as usize;
pub const Q_WIDTH: usize = Q_HEADS * HEAD_DIM;
pub const KV_WIDTH: usize = KV_HEADS * HEAD_DIM;
pub const QKV_WIDTH: usize = Q_WIDTH + 2 * KV_WIDTH;

/// A weight matrix [rows, cols] on the device: bf16, or INT8 with one f32 scale per row (row r
/// stands for `values[r, :] * scales[r]`).
pub enum Matrix {
    Bf16(CudaSlice<u16>),
    Int8 {
        values: CudaSlice<i8>,
        scales: CudaSlice<f32>,
    },
}

impl Matrix {
    /// Bytes the matrix occupies (and a product streams).
    pub fn bytes(&self) -> usize {
        match self {
            Matrix::Bf16(values) => 2 * values.len(),
            Matrix::Int8 { values, scales } => values.len() + 4 * scales.len(),
        }
    }

    /// The bf16 matrix `w` [rows, cols] quantized to INT8 on the device (csrc/quantize.cu; the
    /// same values as `quant::Int8Matrix::quantize`).
    pub fn quantize(gpu: &Gpu, w: &CudaSlice<u16>, rows: usize, cols: usize) -> Result<Matrix> {
        let mut values = gpu.alloc::<i8>(rows * cols)?;
        let mut scales = gpu.alloc::<f32>(rows)?;
        quantize_int8(gpu, &mut values, &mut scales, w, rows, cols)?;
        Ok(Matrix::Int8 { values, scales })
    }

    /// The borrowed form the kernels take.
    pub fn view(&self) -> MatrixRef<'_> {
        match self {
            Matrix::Bf16(values) => MatrixRef::Bf16(values),
            Matrix::Int8 { values, scales } => MatrixRef::Int8 { values, scales },
        }
    }
}

/// A borrowed weight matrix: what the product kernels read.
#[derive(Clone, Copy)]
pub enum MatrixRef<'a> {
    Bf16(&'a CudaSlice<u16>),
    Int8 {
        values: &'a CudaSlice<i8>,
        scales: &'a CudaSlice<f32>,
    },
}

impl MatrixRef<'_> {
    fn is_int8(self) -> bool {
        matches!(self, MatrixRef::Int8 { .. })
    }

    /// The FFI view, after checking the matrix holds [rows, cols].
    fn raw(self, gpu: &Gpu, rows: usize, cols: usize, name: &str) -> Result<ffi::bi_matrix> {
        match self {
            MatrixRef::Bf16(values) => {
                fits(values, rows * cols, name)?;
                Ok(ffi::bi_matrix {
                    values: p(gpu, values).cast(),
                    scales: std::ptr::null(),
                })
            }
            MatrixRef::Int8 { values, scales } => {
                fits(values, rows * cols, name)?;
                fits(scales, rows, name)?;
                Ok(ffi::bi_matrix {
                    values: p(gpu, values).cast(),
                    scales: p(gpu, scales),
                })
            }
        }
    }
}

/// values `[rows, cols]` int8 and scales `[rows]` f32 = the per-row INT8 quantization of w [rows,
/// cols] bf16.
pub fn quantize_int8(
    gpu: &Gpu,
    values: &mut impl DevicePtrMut<i8>,
    scales: &mut impl DevicePtrMut<f32>,
    w: &impl DevicePtr<u16>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    fits(values, rows * cols, "quantize values")?;
    fits(scales, rows, "quantize scales")?;
    fits(w, rows * cols, "quantize w")?;
    let (ri, ci) = (dim(rows, "rows")?, dim(cols, "cols")?);
    // SAFETY: lengths checked above; all pointers are live device buffers used on gpu.stream.
    let code = unsafe {
        ffi::bi_quantize_int8(
            pm(gpu, values),
            pm(gpu, scales),
            p(gpu, w),
            ri,
            ci,
            gpu.raw_stream(),
        )
    };
    check(code, "bi_quantize_int8")
}

/// What `linear` does with its f32 result.
#[derive(Clone, Copy)]
pub enum Epilogue {
    /// out f32 [m, n] = a . w^T
    Store,
    /// out f32 [m, n] += a . w^T (the residual stream)
    AddResidual,
}

/// What runs beside a product, which picks the kernel of a layer product of 17-32 rows
/// (`bi_placement`): `Alone` runs it skinny, its RMSNorm fused; `BesideChain` (a decode step's
/// concurrent chains of rows) tiled.
#[derive(Clone, Copy, Debug)]
pub enum Placement {
    Alone,
    BesideChain,
}

impl Placement {
    fn raw(self) -> ffi::bi_placement {
        match self {
            Placement::Alone => ffi::bi_placement_BI_PLACEMENT_ALONE,
            Placement::BesideChain => ffi::bi_placement_BI_PLACEMENT_BESIDE_CHAIN,
        }
    }
}

fn fits<T>(buffer: &impl DeviceSlice<T>, needed: usize, name: &str) -> Result<()> {
    ensure!(
        buffer.len() >= needed,
        "{name}: buffer of {} elements, launch needs {needed}",
        buffer.len()
    );
    Ok(())
}

fn dim(value: usize, name: &str) -> Result<i32> {
    i32::try_from(value)
        .map_err(|_| anyhow::anyhow!("{name} = {value} does not fit the kernel ABI"))
}

fn p<T>(gpu: &Gpu, buffer: &impl DevicePtr<T>) -> *const T {
    buffer.device_ptr(&gpu.stream).0 as *const T
}

fn pm<T>(gpu: &Gpu, buffer: &mut impl DevicePtrMut<T>) -> *mut T {
    buffer.device_ptr_mut(&gpu.stream).0 as *mut T
}

/// `x[m, hidden]` f32 = `table[tokens[m]]`; table `[vocab, hidden]` bf16.
pub fn embedding(
    gpu: &Gpu,
    x: &mut impl DevicePtrMut<f32>,
    table: &impl DevicePtr<u16>,
    tokens: &impl DevicePtr<i32>,
    m: usize,
    hidden: usize,
    vocab: usize,
) -> Result<()> {
    fits(x, m * hidden, "embedding x")?;
    fits(table, vocab * hidden, "embedding table")?;
    fits(tokens, m, "embedding tokens")?;
    let (mi, hi, vi) = (dim(m, "m")?, dim(hidden, "hidden")?, dim(vocab, "vocab")?);
    // SAFETY: lengths checked above; all pointers are live device buffers used on gpu.stream.
    let code = unsafe {
        ffi::bi_embedding(
            pm(gpu, x),
            p(gpu, table),
            p(gpu, tokens),
            mi,
            hi,
            vi,
            gpu.raw_stream(),
        )
    };
    check(code, "bi_embedding")
}

/// `out[m, hidden]` bf16 = rmsnorm(`x[m, hidden]` f32) * `weight[hidden]`.
pub fn rmsnorm(
    gpu: &Gpu,
    out: &mut impl DevicePtrMut<u16>,
    x: &impl DevicePtr<f32>,
    weight: &impl DevicePtr<u16>,
    m: usize,
    hidden: usize,
    eps: f32,
) -> Result<()> {
    fits(out, m * hidden, "rmsnorm out")?;
    fits(x, m * hidden, "rmsnorm x")?;
    fits(weight, hidden, "rmsnorm weight")?;
    let (mi, hi) = (dim(m, "m")?, dim(hidden, "hidden")?);
    // SAFETY: lengths checked above; all pointers are live device buffers used on gpu.stream.
    let code = unsafe {
        ffi::bi_rmsnorm(
            pm(gpu, out),
            p(gpu, x),
            p(gpu, weight),
            mi,
            hi,
            eps,
            gpu.raw_stream(),
        )
    };
    check(code, "bi_rmsnorm")
}

/// out f32 [m, n] (= or +=) a[m, k] . w[n, k]^T on tensor cores.
pub fn linear(
    gpu: &Gpu,
    out: &mut impl DevicePtrMut<f32>,
    a: &impl DevicePtr<u16>,
    w: MatrixRef<'_>,
    (m, n, k): (usize, usize, usize),
    epilogue: Epilogue,
    placement: Placement,
) -> Result<()> {
    fits(out, m * n, "linear out")?;
    fits(a, m * k, "linear a")?;
    let w = w.raw(gpu, n, k, "linear w")?;
    let kind = match epilogue {
        Epilogue::Store => ffi::bi_epilogue_BI_EPILOGUE_STORE_F32,
        Epilogue::AddResidual => ffi::bi_epilogue_BI_EPILOGUE_ADD_RESIDUAL,
    };
    let (mi, ni, ki) = (dim(m, "m")?, dim(n, "n")?, dim(k, "k")?);
    // SAFETY: every buffer was checked against m, n and k above; pointers are live device memory.
    let code = unsafe {
        ffi::bi_linear(
            pm(gpu, out).cast(),
            p(gpu, a),
            w,
            mi,
            ni,
            ki,
            kind,
            placement.raw(),
            gpu.raw_stream(),
        )
    };
    check(code, "bi_linear")
}

/// out f32 [m, n] (= or +=) rmsnorm(x[m, k]) * norm . w[n, k]^T: RMSNorm fused in front of the
/// product (`scratch` [m, k] bf16 holds the normalized rows when the product runs tiled).
#[allow(clippy::too_many_arguments)]
pub fn norm_linear<O>(
    gpu: &Gpu,
    out: &mut impl DevicePtrMut<O>,
    x: &impl DevicePtr<f32>,
    norm: &impl DevicePtr<u16>,
    eps: f32,
    w: MatrixRef<'_>,
    scratch: &mut impl DevicePtrMut<u16>,
    (m, n, k): (usize, usize, usize),
    epilogue: NormEpilogue,
    placement: Placement,
) -> Result<()> {
    let out_len = match epilogue {
        NormEpilogue::Store => m * n,
        NormEpilogue::SwiGlu => m * n / 2,
    };
    fits(out, out_len, "norm_linear out")?;
    fits(x, m * k, "norm_linear x")?;
    fits(norm, k, "norm_linear norm")?;
    let w = w.raw(gpu, n, k, "norm_linear w")?;
    fits(scratch, m * k, "norm_linear scratch")?;
    let kind = match epilogue {
        NormEpilogue::Store => ffi::bi_epilogue_BI_EPILOGUE_STORE_F32,
        NormEpilogue::SwiGlu => ffi::bi_epilogue_BI_EPILOGUE_SWIGLU,
    };
    let (mi, ni, ki) = (dim(m, "m")?, dim(n, "n")?, dim(k, "k")?);
    // SAFETY: every buffer was checked against m, n and k above; pointers are live device memory.
    let code = unsafe {
        ffi::bi_norm_linear(
            pm(gpu, out).cast(),
            p(gpu, x),
            p(gpu, norm),
            eps,
            w,
            pm(gpu, scratch),
            mi,
            ni,
            ki,
            kind,
            placement.raw(),
            gpu.raw_stream(),
        )
    };
    check(code, "bi_norm_linear")
}

/// What `norm_linear` writes: f32 [m, n] (`out` holds f32), or the SwiGLU of interleaved
/// gate/up rows as bf16 [m, n / 2] (`out` holds u16 bits).
#[derive(Clone, Copy)]
pub enum NormEpilogue {
    Store,
    SwiGlu,
}

/// Row bookkeeping shared by the attention-side kernels: which sequence and position each row
/// is, and the block tables of the sequences.
pub struct Rows<'a, P: DevicePtr<i32>> {
    pub positions: &'a P,    // [m]; negative: padding
    pub row_seq: &'a P,      // [m]
    pub block_tables: &'a P, // [seqs, max_blocks]
    pub max_blocks: usize,
    pub m: usize,
}

impl<P: DevicePtr<i32>> Rows<'_, P> {
    fn check(&self) -> Result<()> {
        fits(self.positions, self.m, "positions")?;
        fits(self.row_seq, self.m, "row_seq")?;
        ensure!(self.max_blocks > 0, "max_blocks must be positive");
        fits(self.block_tables, self.max_blocks, "block_tables")
    }
}

/// The KV cache of one layer: [blocks, 8, 16, 128] bf16 for K and for V.
pub struct LayerCache<'a, C: DevicePtrMut<u16>> {
    pub k: &'a mut C,
    pub v: &'a mut C,
}

/// q_norm/k_norm + RoPE on qkv [m, 4096] f32 into q [m, 16, 128] bf16 and the paged cache.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope_cache<P: DevicePtr<i32>, C: DevicePtrMut<u16>>(
    gpu: &Gpu,
    q: &mut impl DevicePtrMut<u16>,
    cache: LayerCache<'_, C>,
    qkv: &impl DevicePtr<f32>,
    q_norm: &impl DevicePtr<u16>,
    k_norm: &impl DevicePtr<u16>,
    rope_inv_freq: &impl DevicePtr<f32>,
    rows: &Rows<'_, P>,
    eps: f32,
) -> Result<()> {
    rows.check()?;
    fits(q, rows.m * Q_WIDTH, "q")?;
    qk_inputs_fit(&cache, qkv, q_norm, k_norm, rope_inv_freq, rows.m)?;
    let (m, max_blocks) = (dim(rows.m, "m")?, dim(rows.max_blocks, "max_blocks")?);
    // SAFETY: lengths checked above; block ids in the tables come from the host allocator, which
    // hands out only blocks inside this cache; pointers are live device buffers on gpu.stream.
    let code = unsafe {
        ffi::bi_qk_norm_rope_cache(
            pm(gpu, q),
            pm(gpu, cache.k),
            pm(gpu, cache.v),
            p(gpu, qkv),
            p(gpu, q_norm),
            p(gpu, k_norm),
            p(gpu, rope_inv_freq),
            p(gpu, rows.positions),
            p(gpu, rows.row_seq),
            p(gpu, rows.block_tables),
            m,
            max_blocks,
            eps,
            gpu.raw_stream(),
        )
    };
    check(code, "bi_qk_norm_rope_cache")
}

/// Paged causal attention of q [m, 16, 128] into out [m, 2048] bf16, `splits` ranges per row.
#[allow(clippy::too_many_arguments)]
pub fn attention<P: DevicePtr<i32>>(
    gpu: &Gpu,
    out: &mut impl DevicePtrMut<u16>,
    partials: &mut impl DevicePtrMut<f32>,
    counters: &mut impl DevicePtrMut<i32>,
    q: &impl DevicePtr<u16>,
    k_cache: &impl DevicePtr<u16>,
    v_cache: &impl DevicePtr<u16>,
    rows: &Rows<'_, P>,
    splits: usize,
) -> Result<()> {
    attention_outputs_fit(out, partials, counters, rows, splits)?;
    fits(q, rows.m * Q_WIDTH, "attention q")?;
    let (m, max_blocks, s) = (
        dim(rows.m, "m")?,
        dim(rows.max_blocks, "max_blocks")?,
        dim(splits, "splits")?,
    );
    // SAFETY: lengths checked above; block ids come from the host allocator; pointers are live.
    let code = unsafe {
        ffi::bi_attention(
            pm(gpu, out),
            pm(gpu, partials),
            pm(gpu, counters),
            p(gpu, q),
            p(gpu, k_cache),
            p(gpu, v_cache),
            p(gpu, rows.positions),
            p(gpu, rows.row_seq),
            p(gpu, rows.block_tables),
            m,
            max_blocks,
            s,
            gpu.raw_stream(),
        )
    };
    check(code, "bi_attention")
}

/// The row tiles of a prefill pass on the device, for `prefill_attention`: (first row, rows)
/// pairs, each 1 to PREFILL_TILE_ROWS rows of one sequence; checked when written.
pub struct RowTiles {
    pairs: CudaSlice<i32>, // [capacity, 2]
    count: usize,
    end: usize, // rows the tiles reach
}

impl RowTiles {
    pub fn new(gpu: &Gpu, capacity: usize) -> Result<Self> {
        Ok(Self {
            pairs: gpu.alloc(2 * capacity.max(1))?,
            count: 0,
            end: 0,
        })
    }

    /// Replaces the tiles with `tiles` ((first row, rows) each).
    pub fn write(&mut self, gpu: &Gpu, tiles: &[(usize, usize)]) -> Result<()> {
        ensure!(
            2 * tiles.len() <= self.pairs.len(),
            "{} row tiles for room for {}",
            tiles.len(),
            self.pairs.len() / 2
        );
        let mut pairs = Vec::with_capacity(2 * tiles.len());
        for &(first, rows) in tiles {
            ensure!(
                (1..=PREFILL_TILE_ROWS).contains(&rows),
                "a row tile of {rows} rows (1 to {PREFILL_TILE_ROWS})"
            );
            pairs.extend([dim(first, "tile row")?, rows as i32]);
        }
        gpu.write(&mut self.pairs, &pairs)?;
        self.count = tiles.len();
        self.end = tiles
            .iter()
            .map(|&(first, rows)| first + rows)
            .max()
            .unwrap_or(0);
        Ok(())
    }
}

/// `attention` for prompt rows, flash-style: each row tile of `tiles` (rows of one sequence)
/// shares each K/V tile (csrc/prefill_attention.cu).
pub fn prefill_attention<P: DevicePtr<i32>>(
    gpu: &Gpu,
    out: &mut impl DevicePtrMut<u16>,
    q: &impl DevicePtr<u16>,
    k_cache: &impl DevicePtr<u16>,
    v_cache: &impl DevicePtr<u16>,
    rows: &Rows<'_, P>,
    tiles: &RowTiles,
) -> Result<()> {
    attention_out_fits(out, rows)?;
    fits(q, rows.m * Q_WIDTH, "attention q")?;
    ensure!(
        tiles.count > 0 && tiles.end <= rows.m,
        "{} row tiles reaching row {} for {} rows",
        tiles.count,
        tiles.end,
        rows.m
    );
    let (count, max_blocks) = (
        dim(tiles.count, "tiles")?,
        dim(rows.max_blocks, "max_blocks")?,
    );
    // SAFETY: lengths checked above, the tiles inside the rows; block ids come from the host
    // allocator; pointers are live.
    let code = unsafe {
        ffi::bi_prefill_attention(
            pm(gpu, out),
            p(gpu, q),
            p(gpu, k_cache),
            p(gpu, v_cache),
            p(gpu, rows.positions),
            p(gpu, rows.row_seq),
            p(gpu, rows.block_tables),
            p(gpu, &tiles.pairs),
            count,
            max_blocks,
            gpu.raw_stream(),
        )
    };
    check(code, "bi_prefill_attention")
}

/// Decode attention with `qk_norm_rope_cache`'s work folded in (every row a different
/// sequence's next token): the same output as the two kernels, without q; the rows' new K/V
/// rows go into `cache`.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention<P: DevicePtr<i32>, C: DevicePtrMut<u16>>(
    gpu: &Gpu,
    out: &mut impl DevicePtrMut<u16>,
    partials: &mut impl DevicePtrMut<f32>,
    counters: &mut impl DevicePtrMut<i32>,
    cache: LayerCache<'_, C>,
    qkv: &impl DevicePtr<f32>,
    q_norm: &impl DevicePtr<u16>,
    k_norm: &impl DevicePtr<u16>,
    rope_inv_freq: &impl DevicePtr<f32>,
    rows: &Rows<'_, P>,
    splits: usize,
    eps: f32,
) -> Result<()> {
    attention_outputs_fit(out, partials, counters, rows, splits)?;
    qk_inputs_fit(&cache, qkv, q_norm, k_norm, rope_inv_freq, rows.m)?;
    let (m, max_blocks, s) = (
        dim(rows.m, "m")?,
        dim(rows.max_blocks, "max_blocks")?,
        dim(splits, "splits")?,
    );
    // SAFETY: lengths checked above; block ids come from the host allocator, which hands out only
    // blocks inside this cache; pointers are live device buffers on gpu.stream.
    let code = unsafe {
        ffi::bi_decode_attention(
            pm(gpu, out),
            pm(gpu, partials),
            pm(gpu, counters),
            pm(gpu, cache.k),
            pm(gpu, cache.v),
            p(gpu, qkv),
            p(gpu, q_norm),
            p(gpu, k_norm),
            p(gpu, rope_inv_freq),
            p(gpu, rows.positions),
            p(gpu, rows.row_seq),
            p(gpu, rows.block_tables),
            m,
            max_blocks,
            s,
            eps,
            gpu.raw_stream(),
        )
    };
    check(code, "bi_decode_attention")
}

/// The checks of the rows every attention kernel reads and of its output out [m, 2048].
fn attention_out_fits<P: DevicePtr<i32>>(
    out: &impl DevicePtrMut<u16>,
    rows: &Rows<'_, P>,
) -> Result<()> {
    rows.check()?;
    fits(out, rows.m * Q_WIDTH, "attention out")
}

/// The checks of what the split attention kernels write: out [m, 2048], partials, counters.
fn attention_outputs_fit<P: DevicePtr<i32>>(
    out: &impl DevicePtrMut<u16>,
    partials: &impl DevicePtrMut<f32>,
    counters: &impl DevicePtrMut<i32>,
    rows: &Rows<'_, P>,
    splits: usize,
) -> Result<()> {
    attention_out_fits(out, rows)?;
    fits(
        partials,
        rows.m * Q_HEADS * splits * PARTIAL_FLOATS,
        "attention partials",
    )?;
    fits(counters, rows.m * KV_HEADS, "attention counters")
}

/// The checks of what q/k norm + RoPE reads for m rows, and of the layer cache it writes.
fn qk_inputs_fit<C: DevicePtrMut<u16>>(
    cache: &LayerCache<'_, C>,
    qkv: &impl DevicePtr<f32>,
    q_norm: &impl DevicePtr<u16>,
    k_norm: &impl DevicePtr<u16>,
    rope_inv_freq: &impl DevicePtr<f32>,
    m: usize,
) -> Result<()> {
    fits(qkv, m * QKV_WIDTH, "qkv")?;
    fits(q_norm, HEAD_DIM, "q_norm")?;
    fits(k_norm, HEAD_DIM, "k_norm")?;
    fits(rope_inv_freq, HEAD_DIM / 2, "rope_inv_freq")?;
    ensure!(
        cache.k.len() == cache.v.len() && cache.k.len() % (KV_WIDTH * BLOCK_TOKENS) == 0,
        "layer cache shape"
    );
    Ok(())
}

/// Timing knobs of the fused layer kernel (benchmarks only; `Engine::set_layer_knobs`).
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerKnobs {
    /// Phases left out (a mask of the SKIP_ constants): the results are then wrong.
    pub skip_phases: u32,
    /// Weight bytes in flight per block; 0: the kernel's default.
    pub copy_window: u32,
}

/// Phases of the fused layer kernel a timing run may leave out.
pub const SKIP_QKV: u32 = ffi::bi_layer_phase_BI_SKIP_QKV;
pub const SKIP_ATTENTION: u32 = ffi::bi_layer_phase_BI_SKIP_ATTENTION;
pub const SKIP_O: u32 = ffi::bi_layer_phase_BI_SKIP_O;
pub const SKIP_GATE_UP: u32 = ffi::bi_layer_phase_BI_SKIP_GATE_UP;
pub const SKIP_DOWN: u32 = ffi::bi_layer_phase_BI_SKIP_DOWN;
pub const SKIP_BARRIERS: u32 = ffi::bi_layer_phase_BI_SKIP_BARRIERS;

/// Clock stamps per block of a traced `decode_layer` launch (csrc/braidinfer.h says which).
pub const TRACE_EVENTS: usize = ffi::BI_TRACE_EVENTS as usize;

/// The most rows `decode_layer` takes (one m16 tensor-core tile).
pub const DECODE_LAYER_MAX_ROWS: usize = 16;

/// One decoder layer's weights on the device, as `decode_layer` reads them (the four matrices
/// all bf16 or all INT8).
pub struct DecodeLayer<'a> {
    pub input_norm: &'a CudaSlice<u16>, // [1024]
    pub qkv: MatrixRef<'a>,             // [4096, 1024]
    pub q_norm: &'a CudaSlice<u16>,     // [128]
    pub k_norm: &'a CudaSlice<u16>,     // [128]
    pub o: MatrixRef<'a>,               // [1024, 2048]
    pub post_norm: &'a CudaSlice<u16>,  // [1024]
    pub gate_up: MatrixRef<'a>,         // [6144, 1024] interleaved
    pub down: MatrixRef<'a>,            // [1024, 3072]
}

/// The decode step's buffers that `decode_layer` updates or uses as scratch.
pub struct DecodeScratch<'a> {
    pub x: CudaViewMut<'a, f32>,          // [m, 1024]
    pub qkv: CudaViewMut<'a, f32>,        // [m, 4096]
    pub attn: CudaViewMut<'a, u16>,       // [m, 2048]
    pub act: CudaViewMut<'a, u16>,        // [m, 3072]
    pub partials: CudaViewMut<'a, f32>,   // [m, 16, splits, 130]
    pub counters: CudaViewMut<'a, i32>,   // [m, 8]
    pub arrivals: &'a mut CudaSlice<u64>, // [1 + 8] grid-barrier arrivals, then kv heads done
}

/// A whole decoder layer for up to 16 decode rows in one launch (csrc/layer.cu).
#[allow(clippy::too_many_arguments)]
pub fn decode_layer<P: DevicePtr<i32>, C: DevicePtrMut<u16>>(
    gpu: &Gpu,
    layer: &DecodeLayer<'_>,
    cache: LayerCache<'_, C>,
    mut scratch: DecodeScratch<'_>,
    rows: &Rows<'_, P>,
    rope_inv_freq: &CudaSlice<f32>,
    splits: usize,
    eps: f32,
    knobs: LayerKnobs,
    trace: Option<CudaViewMut<'_, u64>>,
) -> Result<()> {
    rows.check()?;
    let m = rows.m;
    ensure!(
        m <= DECODE_LAYER_MAX_ROWS,
        "decode_layer takes at most {DECODE_LAYER_MAX_ROWS} rows, got {m}"
    );
    ensure!(
        (1..=MAX_SPLITS).contains(&splits),
        "attention splits {splits} outside 1..={MAX_SPLITS}"
    );
    for (tensor, len, name) in [
        (layer.input_norm, HIDDEN, "input_norm"),
        (layer.q_norm, HEAD_DIM, "q_norm"),
        (layer.k_norm, HEAD_DIM, "k_norm"),
        (layer.post_norm, HIDDEN, "post_norm"),
    ] {
        fits(tensor, len, name)?;
    }
    ensure!(
        [layer.o, layer.gate_up, layer.down]
            .iter()
            .all(|m| m.is_int8() == layer.qkv.is_int8()),
        "decode_layer: the layer's matrices must be all bf16 or all INT8"
    );
    fits(&scratch.x, m * HIDDEN, "x")?;
    fits(&scratch.qkv, m * QKV_WIDTH, "qkv scratch")?;
    fits(&scratch.attn, m * Q_WIDTH, "attn scratch")?;
    fits(&scratch.act, m * INTERMEDIATE, "act scratch")?;
    fits(
        &scratch.partials,
        m * Q_HEADS * splits * PARTIAL_FLOATS,
        "partials",
    )?;
    fits(&scratch.counters, m * KV_HEADS, "counters")?;
    fits(scratch.arrivals, 1 + KV_HEADS, "arrivals")?;
    fits(rope_inv_freq, HEAD_DIM / 2, "rope_inv_freq")?;
    ensure!(
        cache.k.len() == cache.v.len() && cache.k.len() % (KV_WIDTH * BLOCK_TOKENS) == 0,
        "layer cache shape"
    );
    let weights = ffi::bi_layer_weights {
        input_norm: p(gpu, layer.input_norm),
        qkv: layer.qkv.raw(gpu, QKV_WIDTH, HIDDEN, "qkv")?,
        q_norm: p(gpu, layer.q_norm),
        k_norm: p(gpu, layer.k_norm),
        o: layer.o.raw(gpu, HIDDEN, Q_WIDTH, "o")?,
        post_norm: p(gpu, layer.post_norm),
        gate_up: layer
            .gate_up
            .raw(gpu, 2 * INTERMEDIATE, HIDDEN, "gate_up")?,
        down: layer.down.raw(gpu, HIDDEN, INTERMEDIATE, "down")?,
        k_cache: pm(gpu, cache.k),
        v_cache: pm(gpu, cache.v),
    };
    let state = ffi::bi_layer_state {
        x: pm(gpu, &mut scratch.x),
        qkv: pm(gpu, &mut scratch.qkv),
        attn: pm(gpu, &mut scratch.attn),
        act: pm(gpu, &mut scratch.act),
        partials: pm(gpu, &mut scratch.partials),
        counters: pm(gpu, &mut scratch.counters),
        arrivals: pm(gpu, scratch.arrivals),
        positions: p(gpu, rows.positions),
        row_seq: p(gpu, rows.row_seq),
        block_tables: p(gpu, rows.block_tables),
        rope_inv_freq: p(gpu, rope_inv_freq),
        m: dim(m, "m")?,
        max_blocks: dim(rows.max_blocks, "max_blocks")?,
        splits: dim(splits, "splits")?,
        eps,
        skip_phases: knobs.skip_phases,
        copy_window: knobs.copy_window,
        trace: match trace {
            Some(mut t) => {
                let sms = gpu.multiprocessors()?;
                fits(&t, sms * TRACE_EVENTS, "trace")?;
                pm(gpu, &mut t).cast()
            }
            None => std::ptr::null_mut(),
        },
    };
    // SAFETY: every buffer was checked against the shapes above; block ids come from the host
    // allocator; the structs hold live device pointers and are copied by the launch.
    let code = unsafe { ffi::bi_decode_layer(&weights, &state, gpu.raw_stream()) };
    check(code, "bi_decode_layer")
}

/// The sampler's device state for `batch` rows.
pub struct SampleState<'a, I: DevicePtrMut<i32>, U: DevicePtrMut<u32>> {
    pub tokens: &'a mut I,    // [batch] out: the sampled token
    pub positions: &'a mut I, // [batch] advanced by one; negative rows are skipped
    pub steps: &'a mut U,     // [batch] advanced by one
}

/// Samples one token per row of logits [batch, vocab] f32 on the device.
#[allow(clippy::too_many_arguments)]
pub fn sample<I: DevicePtrMut<i32>, U: DevicePtrMut<u32>>(
    gpu: &Gpu,
    state: SampleState<'_, I, U>,
    cand_values: &mut impl DevicePtrMut<f32>,
    cand_ids: &mut impl DevicePtrMut<i32>,
    logits: &impl DevicePtr<f32>,
    params: &impl DevicePtr<SamplingParamsRaw>,
    batch: usize,
    vocab: usize,
) -> Result<()> {
    fits(state.tokens, batch, "sample tokens")?;
    fits(state.positions, batch, "sample positions")?;
    fits(state.steps, batch, "sample steps")?;
    fits(
        cand_values,
        batch * SAMPLE_CHUNKS * MAX_TOP_K,
        "sample candidates",
    )?;
    fits(
        cand_ids,
        batch * SAMPLE_CHUNKS * MAX_TOP_K,
        "sample candidates",
    )?;
    fits(logits, batch * vocab, "sample logits")?;
    fits(params, batch, "sample params")?;
    let (b, v) = (dim(batch, "batch")?, dim(vocab, "vocab")?);
    // SAFETY: lengths checked above; all pointers are live device buffers used on gpu.stream.
    let code = unsafe {
        ffi::bi_sample(
            pm(gpu, state.tokens),
            pm(gpu, state.positions),
            pm(gpu, state.steps),
            pm(gpu, cand_values),
            pm(gpu, cand_ids),
            p(gpu, logits),
            p(gpu, params),
            b,
            v,
            gpu.raw_stream(),
        )
    };
    check(code, "bi_sample")
}
