//! Attention: q/k norm + RoPE with the paged KV-cache write, decode attention (split along the
//! sequence, or with its queries prepared in the same kernel) and prefill attention.

use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::{
    dim, fits, p, pm, BLOCK_TOKENS, HEAD_DIM, KV_HEADS, KV_WIDTH, PARTIAL_FLOATS,
    PREFILL_TILE_ROWS, QKV_WIDTH, Q_HEADS, Q_WIDTH,
};
use crate::gpu::device::{check, Gpu};
use crate::gpu::ffi;

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
    pub(super) fn check(&self) -> Result<()> {
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
