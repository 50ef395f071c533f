//! The fused decode layer (csrc/layer.cu): a whole decoder layer for up to 16 rows in one launch.

use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, CudaViewMut, DevicePtr, DevicePtrMut};

use super::{
    dim, fits, p, pm, LayerCache, MatrixRef, Rows, BLOCK_TOKENS, HEAD_DIM, HIDDEN, INTERMEDIATE,
    KV_HEADS, KV_WIDTH, MAX_SPLITS, PARTIAL_FLOATS, QKV_WIDTH, Q_HEADS, Q_WIDTH,
};
use crate::gpu::device::{check, Gpu};
use crate::gpu::ffi;

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
