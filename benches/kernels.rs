//! Kernel-level decode costs: each kernel of a batch-1 decode step at Qwen3-0.6B shapes, 28
//! launches captured in one CUDA graph (as in the step), timed over replays (CUDA events,
//! median). Shows what each kernel costs in the graph, launch and dependency gaps included,
//! against the bytes it must move and the copy bandwidth measured in the same run.
//!
//!     cargo bench --bench kernels

use anyhow::{Context, Result};
use cudarc::driver::{sys, CudaSlice};

use braidinfer::bench::{copy_bandwidth, Timer};
use braidinfer::gpu::kernels::{
    self, Epilogue, LayerCache, Matrix, MatrixRef, NormEpilogue, Rows, HIDDEN, INTERMEDIATE,
    KV_WIDTH, QKV_WIDTH, Q_WIDTH,
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
        graph_us(&gpu, LAYERS, |i| {
            kernels::norm_linear(
                &gpu,
                &mut qkv_out,
                &x,
                &norm,
                1e-6,
                MatrixRef::Bf16(&qkv[i]),
                &mut scratch,
                (1, QKV_WIDTH, HIDDEN),
                NormEpilogue::Store,
            )
        })?,
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
        })?,
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
        })?,
    ));
    table.push((
        "o: [1024 x 2048] + residual",
        mb(HIDDEN * Q_WIDTH),
        graph_us(&gpu, LAYERS, |i| {
            kernels::linear(
                &gpu,
                &mut residual,
                &attn,
                MatrixRef::Bf16(&o[i]),
                (1, HIDDEN, Q_WIDTH),
                Epilogue::AddResidual,
            )
        })?,
    ));
    table.push((
        "gate/up: rmsnorm + [6144 x 1024] + SwiGLU",
        mb(2 * INTERMEDIATE * HIDDEN),
        graph_us(&gpu, LAYERS, |i| {
            kernels::norm_linear(
                &gpu,
                &mut act,
                &x,
                &norm,
                1e-6,
                MatrixRef::Bf16(&gate_up[i]),
                &mut scratch,
                (1, 2 * INTERMEDIATE, HIDDEN),
                NormEpilogue::SwiGlu,
            )
        })?,
    ));
    table.push((
        "down: [1024 x 3072] + residual",
        mb(HIDDEN * INTERMEDIATE),
        graph_us(&gpu, LAYERS, |i| {
            kernels::linear(
                &gpu,
                &mut residual,
                &act,
                MatrixRef::Bf16(&down[i]),
                (1, HIDDEN, INTERMEDIATE),
                Epilogue::AddResidual,
            )
        })?,
    ));
    // The LM head with bf16 weights and with their INT8 quantization.
    let head_int8 = Matrix::quantize(&gpu, &lm_head, 151_936, HIDDEN)?;
    let mut head_us = |head: MatrixRef<'_>| {
        graph_us(&gpu, 1, |_| {
            kernels::norm_linear(
                &gpu,
                &mut logits,
                &x,
                &norm,
                1e-6,
                head,
                &mut scratch,
                (1, 151_936, HIDDEN),
                NormEpilogue::Store,
            )
        })
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
    for (name, bytes, us) in &table {
        let per = us / LAYERS as f64;
        layer_total += per;
        let gbs = *bytes as f64 / (per * 1e-6) / 1e9;
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
    Ok(())
}
