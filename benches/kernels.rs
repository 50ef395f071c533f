//! Kernel-level decode costs: each kernel of a batch-1 decode step at Qwen3-0.6B shapes, 28
//! launches captured in one CUDA graph (as in the step), timed over replays (CUDA events,
//! median). Shows what each kernel costs in the graph, launch and dependency gaps included,
//! against the bytes it must move and the copy bandwidth measured in the same run.
//!
//!     cargo bench --bench kernels

use anyhow::{Context, Result};
use cudarc::driver::{sys, CudaSlice, DevicePtrMut};

use braidinfer::bench::{copy_bandwidth, Timer};
use braidinfer::gpu::kernels::{
    self, Epilogue, LayerCache, Matrix, MatrixRef, NormEpilogue, Placement, Rows, HIDDEN,
    INTERMEDIATE, KV_WIDTH, QKV_WIDTH, Q_WIDTH,
};
use braidinfer::gpu::Gpu;
use braidinfer::rng::SplitMix64;

const LAYERS: usize = 28;
const CONTEXT: usize = 1024;

fn random_bf16(gpu: &Gpu, rng: &mut SplitMix64, n: usize, scale: f32) -> Result<CudaSlice<u16>> {
    let host: Vec<u16> = (0..n)
        .map(|_| half::bf16::from_f32(rng.centered(scale)).to_bits())
        .collect();
    gpu.upload(&host)
}

/// Median microseconds of one replay of a graph holding `launches` calls of `op`.
fn graph_us(gpu: &Gpu, launches: usize, mut op: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    gpu.synchronize()?;
    for i in 0..launches {
        op(i)?; // eagerly once: modules load outside the capture
    }
    gpu.synchronize()?;
    gpu.stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
    let captured = (0..launches).try_for_each(&mut op);
    let graph = gpu.stream.end_capture(sys::CUgraphInstantiate_flags(0));
    captured?;
    let graph = graph?.context("empty capture")?;
    let mut unit = ();
    Ok(1e3
        * Timer::new(gpu)?.median_ms(
            5,
            50,
            &mut unit,
            |_| Ok(()),
            |_| graph.launch().context("replay"),
        )?)
}

fn bf16_refs(matrices: &[CudaSlice<u16>]) -> Vec<MatrixRef<'_>> {
    matrices.iter().map(MatrixRef::Bf16).collect()
}

/// Median microseconds per launch of rmsnorm(x) . w^T, one launch per matrix of `weights` in
/// one graph (distinct matrices, as a step's layers, so that none is served from L2).
#[allow(clippy::too_many_arguments)]
fn norm_product_us<O>(
    gpu: &Gpu,
    out: &mut impl DevicePtrMut<O>,
    x: &CudaSlice<f32>,
    norm: &CudaSlice<u16>,
    weights: &[MatrixRef<'_>],
    scratch: &mut CudaSlice<u16>,
    dims: (usize, usize, usize),
    epilogue: NormEpilogue,
) -> Result<f64> {
    let us = graph_us(gpu, weights.len(), |i| {
        kernels::norm_linear(
            gpu,
            out,
            x,
            norm,
            1e-6,
            weights[i],
            scratch,
            dims,
            epilogue,
            Placement::Alone,
        )
    })?;
    Ok(us / weights.len() as f64)
}

/// The same for a . w^T.
fn product_us(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    a: &CudaSlice<u16>,
    weights: &[MatrixRef<'_>],
    dims: (usize, usize, usize),
    epilogue: Epilogue,
) -> Result<f64> {
    let us = graph_us(gpu, weights.len(), |i| {
        kernels::linear(gpu, out, a, weights[i], dims, epilogue, Placement::Alone)
    })?;
    Ok(us / weights.len() as f64)
}

fn main() -> Result<()> {
    let gpu = match Gpu::open() {
        Ok(gpu) => gpu,
        Err(e) => {
            println!("SKIPPED kernel benchmark: no GPU ({e:#})");
            return Ok(());
        }
    };
    let copy = copy_bandwidth(&gpu)?;
    let mut rng = SplitMix64::new(3);
    // Distinct weights per layer, as in the model, so that nothing is served from L2.
    let qkv: Vec<_> = (0..LAYERS)
        .map(|_| random_bf16(&gpu, &mut rng, QKV_WIDTH * HIDDEN, 0.03))
        .collect::<Result<_>>()?;
    let o: Vec<_> = (0..LAYERS)
        .map(|_| random_bf16(&gpu, &mut rng, HIDDEN * Q_WIDTH, 0.03))
        .collect::<Result<_>>()?;
    let gate_up: Vec<_> = (0..LAYERS)
        .map(|_| random_bf16(&gpu, &mut rng, 2 * INTERMEDIATE * HIDDEN, 0.03))
        .collect::<Result<_>>()?;
    let down: Vec<_> = (0..LAYERS)
        .map(|_| random_bf16(&gpu, &mut rng, HIDDEN * INTERMEDIATE, 0.02))
        .collect::<Result<_>>()?;
    let (qkv, o, gate_up, down) = (
        bf16_refs(&qkv),
        bf16_refs(&o),
        bf16_refs(&gate_up),
        bf16_refs(&down),
    );
    let norm = random_bf16(&gpu, &mut rng, HIDDEN, 1.0)?;
    let head_norm = random_bf16(&gpu, &mut rng, 128, 1.0)?;
    let lm_head = random_bf16(&gpu, &mut rng, 151_936 * HIDDEN, 0.03)?;
    let x = gpu.upload(&(0..HIDDEN).map(|_| rng.centered(1.0)).collect::<Vec<f32>>())?;
    let mut residual = gpu.alloc::<f32>(HIDDEN)?;
    let mut scratch = gpu.alloc::<u16>(HIDDEN)?;
    let mut qkv_out = gpu.upload(
        &(0..QKV_WIDTH)
            .map(|_| rng.centered(1.0))
            .collect::<Vec<f32>>(),
    )?;
    let mut act = random_bf16(&gpu, &mut rng, INTERMEDIATE, 1.0)?;
    let mut attn = random_bf16(&gpu, &mut rng, Q_WIDTH, 1.0)?;
    let mut q = random_bf16(&gpu, &mut rng, Q_WIDTH, 1.0)?;
    let mut logits = gpu.alloc::<f32>(151_936)?;
    let blocks = CONTEXT / 16 + 1;
    let mut k_cache = random_bf16(&gpu, &mut rng, LAYERS * blocks * 16 * KV_WIDTH, 1.0)?;
    let mut v_cache = random_bf16(&gpu, &mut rng, LAYERS * blocks * 16 * KV_WIDTH, 1.0)?;
    let positions = gpu.upload(&[CONTEXT as i32])?;
    let row_seq = gpu.upload(&[0i32])?;
    let tables = gpu.upload(&(0..blocks as i32).collect::<Vec<_>>())?;
    let rope = gpu.upload(&vec![0.01f32; 64])?;
    let splits = 32;
    let mut partials = gpu.alloc::<f32>(16 * splits * kernels::PARTIAL_FLOATS)?;
    let mut counters = gpu.alloc::<i32>(8)?;
    let per_layer = blocks * 16 * KV_WIDTH;
    let rows = Rows {
        positions: &positions,
        row_seq: &row_seq,
        block_tables: &tables,
        max_blocks: blocks,
        m: 1,
    };

    let mut table: Vec<(&str, usize, f64)> = Vec::new();
    let mb = |elements: usize| elements * 2;
    table.push((
        "qkv: rmsnorm + [4096 x 1024]",
        mb(QKV_WIDTH * HIDDEN),
        norm_product_us(
            &gpu,
            &mut qkv_out,
            &x,
            &norm,
            &qkv,
            &mut scratch,
            (1, QKV_WIDTH, HIDDEN),
            NormEpilogue::Store,
        )?,
    ));
    table.push((
        "q/k norm + rope + cache write",
        0,
        graph_us(&gpu, LAYERS, |i| {
            let mut k = k_cache.slice_mut(i * per_layer..(i + 1) * per_layer);
            let mut v = v_cache.slice_mut(i * per_layer..(i + 1) * per_layer);
            kernels::qk_norm_rope_cache(
                &gpu,
                &mut q,
                LayerCache {
                    k: &mut k,
                    v: &mut v,
                },
                &qkv_out,
                &head_norm,
                &head_norm,
                &rope,
                &rows,
                1e-6,
            )
        })? / LAYERS as f64,
    ));
    table.push((
        "attention, context 1024",
        2 * (CONTEXT + 1) * KV_WIDTH * 2,
        graph_us(&gpu, LAYERS, |i| {
            let (k, v) = (
                k_cache.slice(i * per_layer..(i + 1) * per_layer),
                v_cache.slice(i * per_layer..(i + 1) * per_layer),
            );
            kernels::attention(
                &gpu,
                &mut attn,
                &mut partials,
                &mut counters,
                &q,
                &k,
                &v,
                &rows,
                splits,
            )
        })? / LAYERS as f64,
    ));
    table.push((
        "o: [1024 x 2048] + residual",
        mb(HIDDEN * Q_WIDTH),
        product_us(
            &gpu,
            &mut residual,
            &attn,
            &o,
            (1, HIDDEN, Q_WIDTH),
            Epilogue::AddResidual,
        )?,
    ));
    table.push((
        "gate/up: rmsnorm + [6144 x 1024] + SwiGLU",
        mb(2 * INTERMEDIATE * HIDDEN),
        norm_product_us(
            &gpu,
            &mut act,
            &x,
            &norm,
            &gate_up,
            &mut scratch,
            (1, 2 * INTERMEDIATE, HIDDEN),
            NormEpilogue::SwiGlu,
        )?,
    ));
    table.push((
        "down: [1024 x 3072] + residual",
        mb(HIDDEN * INTERMEDIATE),
        product_us(
            &gpu,
            &mut residual,
            &act,
            &down,
            (1, HIDDEN, INTERMEDIATE),
            Epilogue::AddResidual,
        )?,
    ));
    // The LM head with bf16 weights and with their INT8 quantization.
    let head_int8 = Matrix::quantize(&gpu, &lm_head, 151_936, HIDDEN)?;
    let mut head_us = |head: MatrixRef<'_>| {
        norm_product_us(
            &gpu,
            &mut logits,
            &x,
            &norm,
            &[head],
            &mut scratch,
            (1, 151_936, HIDDEN),
            NormEpilogue::Store,
        )
    };
    let heads = [
        (
            "lm head: rmsnorm + [151936 x 1024]",
            151_936 * HIDDEN * 2,
            head_us(MatrixRef::Bf16(&lm_head))?,
        ),
        (
            "lm head, int8 weights",
            head_int8.bytes(),
            head_us(head_int8.view())?,
        ),
    ];

    println!(
        "copy bandwidth {:.0} GB/s; per launch, median of graph replays of {LAYERS} launches:",
        copy / 1e9
    );
    println!(
        "{:<44} {:>10} {:>10} {:>9}",
        "kernel", "us", "GB/s", "of copy"
    );
    let mut layer_total = 0.0;
    for &(name, bytes, per) in &table {
        layer_total += per;
        let gbs = bytes as f64 / (per * 1e-6) / 1e9;
        println!(
            "{name:<44} {per:>10.2} {gbs:>10.0} {:>8.1}%",
            100.0 * gbs * 1e9 / copy
        );
    }
    for (name, bytes, us) in heads {
        let gbs = bytes as f64 / (us * 1e-6) / 1e9;
        println!(
            "{name:<44} {us:>10.2} {gbs:>10.0} {:>8.1}%",
            100.0 * gbs * 1e9 / copy
        );
    }
    println!(
        "one layer: {layer_total:.2} us; 28 layers + lm head: {:.1} us",
        layer_total * LAYERS as f64 + heads[0].2
    );
    let layer_weights = LayerWeights {
        qkv: &qkv,
        o: &o,
        gate_up: &gate_up,
        down: &down,
        norm: &norm,
        lm_head: &lm_head,
    };
    batched_products(&gpu, &mut rng, &layer_weights, copy)?;
    batched_attention(&gpu, copy)
}

/// Attention of a decode step of m sequences at context 512 (one range per row, as the engine
/// runs above batch 16), every layer its own cache: K/V bandwidth against the copy bandwidth.
fn batched_attention(gpu: &Gpu, copy: f64) -> Result<()> {
    const CONTEXT: usize = 512;
    println!("decode attention, context {CONTEXT} (graphs of {LAYERS} launches):");
    println!("{:>4} {:>9} {:>9}", "m", "us", "of copy");
    for m in [32, 64, 128, 256] {
        let blocks = CONTEXT / 16 + 1; // per sequence
        let per_layer = m * blocks * 16 * KV_WIDTH;
        // Zeros: the timing does not depend on the values.
        let k_cache = gpu.alloc::<u16>(LAYERS * per_layer)?;
        let v_cache = gpu.alloc::<u16>(LAYERS * per_layer)?;
        let positions = gpu.upload(&vec![CONTEXT as i32 - 1; m])?;
        let row_seq = gpu.upload(&(0..m as i32).collect::<Vec<_>>())?;
        let tables = gpu.upload(&(0..(m * blocks) as i32).collect::<Vec<_>>())?;
        let q = gpu.alloc::<u16>(m * Q_WIDTH)?;
        let mut out = gpu.alloc::<u16>(m * Q_WIDTH)?;
        let mut partials = gpu.alloc::<f32>(m * 16 * kernels::PARTIAL_FLOATS)?;
        let mut counters = gpu.alloc::<i32>(m * 8)?;
        let rows = Rows {
            positions: &positions,
            row_seq: &row_seq,
            block_tables: &tables,
            max_blocks: blocks,
            m,
        };
        let us = graph_us(gpu, LAYERS, |i| {
            let (k, v) = (
                k_cache.slice(i * per_layer..(i + 1) * per_layer),
                v_cache.slice(i * per_layer..(i + 1) * per_layer),
            );
            kernels::attention(
                gpu,
                &mut out,
                &mut partials,
                &mut counters,
                &q,
                &k,
                &v,
                &rows,
                1,
            )
        })? / LAYERS as f64;
        let bytes = (2 * m * CONTEXT * KV_WIDTH * 2) as f64;
        println!(
            "{m:>4} {us:>9.2} {:>8.1}%",
            100.0 * bytes / (us * 1e-6) / copy
        );
    }
    Ok(())
}

struct LayerWeights<'a> {
    qkv: &'a [MatrixRef<'a>],
    o: &'a [MatrixRef<'a>],
    gate_up: &'a [MatrixRef<'a>],
    down: &'a [MatrixRef<'a>],
    norm: &'a CudaSlice<u16>,
    lm_head: &'a CudaSlice<u16>,
}

/// The products of a decode step of m rows (the separate kernels above batch 16): per launch,
/// weight bandwidth against the copy bandwidth, and the matrix rate.
fn batched_products(
    gpu: &Gpu,
    rng: &mut SplitMix64,
    w: &LayerWeights<'_>,
    copy: f64,
) -> Result<()> {
    const MOST_ROWS: usize = 256;
    let x = gpu.upload(
        &(0..MOST_ROWS * HIDDEN)
            .map(|_| rng.centered(1.0))
            .collect::<Vec<f32>>(),
    )?;
    let attn = random_bf16(gpu, rng, MOST_ROWS * Q_WIDTH, 1.0)?;
    let act_in = random_bf16(gpu, rng, MOST_ROWS * INTERMEDIATE, 1.0)?;
    let mut wide = gpu.alloc::<f32>(MOST_ROWS * 151_936)?;
    let mut residual = gpu.alloc::<f32>(MOST_ROWS * HIDDEN)?;
    let mut act = gpu.alloc::<u16>(MOST_ROWS * INTERMEDIATE)?;
    let mut scratch = gpu.alloc::<u16>(MOST_ROWS * HIDDEN)?;
    println!("decode products of m rows (graphs of {LAYERS} launches; the LM head 1):");
    println!(
        "{:>4} {:<8} {:>9} {:>9} {:>9}",
        "m", "product", "us", "of copy", "TFLOP/s"
    );
    for m in [32, 64, 128, 256] {
        let qkv = norm_product_us(
            gpu,
            &mut wide,
            &x,
            w.norm,
            w.qkv,
            &mut scratch,
            (m, QKV_WIDTH, HIDDEN),
            NormEpilogue::Store,
        )?;
        let o = product_us(
            gpu,
            &mut residual,
            &attn,
            w.o,
            (m, HIDDEN, Q_WIDTH),
            Epilogue::AddResidual,
        )?;
        let gate_up = norm_product_us(
            gpu,
            &mut act,
            &x,
            w.norm,
            w.gate_up,
            &mut scratch,
            (m, 2 * INTERMEDIATE, HIDDEN),
            NormEpilogue::SwiGlu,
        )?;
        let down = product_us(
            gpu,
            &mut residual,
            &act_in,
            w.down,
            (m, HIDDEN, INTERMEDIATE),
            Epilogue::AddResidual,
        )?;
        let head = norm_product_us(
            gpu,
            &mut wide,
            &x,
            w.norm,
            &[MatrixRef::Bf16(w.lm_head)],
            &mut scratch,
            (m, 151_936, HIDDEN),
            NormEpilogue::Store,
        )?;
        for (name, (n, k), us) in [
            ("qkv", (QKV_WIDTH, HIDDEN), qkv),
            ("o", (HIDDEN, Q_WIDTH), o),
            ("gate/up", (2 * INTERMEDIATE, HIDDEN), gate_up),
            ("down", (HIDDEN, INTERMEDIATE), down),
            ("lm head", (151_936, HIDDEN), head),
        ] {
            let seconds = us * 1e-6;
            println!(
                "{m:>4} {name:<8} {us:>9.2} {:>8.1}% {:>9.0}",
                100.0 * (2 * n * k) as f64 / seconds / copy,
                2.0 * (m * n * k) as f64 / seconds / 1e12
            );
        }
    }
    Ok(())
}
