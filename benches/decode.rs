//! Batch-1 decode and prefill of Qwen3-0.6B (synthetic weights, real shapes) on the GPU.
//!
//! For each context: median step time over graph replays (CUDA events; the position is reset
//! before each replay so the context stays fixed), tok/s, bytes moved per step (weights + KV
//! read + KV written), achieved bandwidth and its fraction of the device-to-device copy
//! bandwidth measured in the same run. Then what each phase of the fused layer kernel costs
//! (the step timed with that phase left out; the difference), at batch 1 or with
//! `--breakdown-batch` sequences (up to 16), and the prefill rate of a 2,000-token prompt.
//!
//!     cargo bench --bench decode -- [--contexts 128,1024,4096] [--runs 200] [--json PATH]
//!         [--breakdown-context 1024] [--breakdown-batch 1] [--trace PATH]

use anyhow::Result;
use clap::Parser;

use braidinfer::bench::{copy_bandwidth, decode_step_ms, median, prefill_seconds};
use braidinfer::config::ModelConfig;
use braidinfer::gpu::kernels::{self, LayerKnobs};
use braidinfer::gpu::kv_cache::bytes_per_position;
use braidinfer::gpu::{Engine, EngineOptions, Gpu};
use braidinfer::quant::Quant;
use braidinfer::rng::SplitMix64;
use braidinfer::roofline;
use braidinfer::sampling::SamplingParams;
use braidinfer::synthetic::synthetic_weights;

#[derive(Parser)]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "128,1024,4096")]
    contexts: Vec<usize>,
    #[arg(long, default_value_t = 200)]
    runs: usize,
    #[arg(long, default_value_t = 2000)]
    prefill_tokens: usize,
    /// Context of the per-phase breakdown (0: none).
    #[arg(long, default_value_t = 1024)]
    breakdown_context: usize,
    /// Sequences decoded together in the breakdown and the timeline (up to 16: the fused layer
    /// kernel's rows), each at the breakdown context.
    #[arg(long, default_value_t = 1)]
    breakdown_batch: usize,
    /// Also time the step with these weight bytes in flight per block (KiB; tuning).
    #[arg(long, value_delimiter = ',')]
    copy_windows: Vec<u32>,
    /// Also record the fused layer launches' per-block timelines at the breakdown context,
    /// print a summary and write them here (JSON: [layers, SMs, events] in ns).
    #[arg(long)]
    trace: Option<std::path::PathBuf>,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Weights of the linear layers and the LM head.
    #[arg(long, value_enum, default_value_t = Quant::Bf16)]
    quant: Quant,
    /// Ignored: cargo bench passes it.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    anyhow::ensure!(
        (1..=kernels::DECODE_LAYER_MAX_ROWS).contains(&args.breakdown_batch),
        "--breakdown-batch takes 1..={} (the fused layer kernel's rows)",
        kernels::DECODE_LAYER_MAX_ROWS
    );
    let gpu = match Gpu::open() {
        Ok(gpu) => gpu,
        Err(e) => {
            println!("SKIPPED decode benchmark: no GPU ({e:#})");
            return Ok(());
        }
    };
    let device = gpu.name();
    let copy = copy_bandwidth(&gpu)?;
    let config = ModelConfig::qwen3_0_6b();
    let weights = synthetic_weights(&config, 0);
    let longest = args
        .contexts
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(args.prefill_tokens)
        + 16;
    let options = EngineOptions {
        max_batch: args.breakdown_batch,
        kv_cache_bytes: Some(args.breakdown_batch * longest * bytes_per_position(config.layers)),
        quant: args.quant,
        ..Default::default()
    };
    let mut engine = Engine::new(gpu, &config, &weights, &options)?;
    let nodes = engine.capture()?.last().map_or(0, |&(_, nodes)| nodes);
    let weight_bytes = engine.weight_bytes_per_step() as f64;
    let mut rng = SplitMix64::new(1);
    let mut prompt = |len: usize| -> Vec<u32> {
        (0..len)
            .map(|_| (rng.next_u64() % 151_000) as u32)
            .collect()
    };

    let mut rows = Vec::new();
    for &context in &args.contexts {
        engine.start_sequence(0, &prompt(context), 8, &SamplingParams::greedy(), 0, false)?;
        let ms = decode_step_ms(&mut engine, &[context as i32], 20, args.runs)?;
        let bytes = roofline::step_bytes(&config, weight_bytes, 1, context);
        let bandwidth = bytes / (ms * 1e-3);
        rows.push(serde_json::json!({
            "context": context, "step_ms": ms, "tokens_per_s": 1e3 / ms, "bytes_per_step": bytes,
            "bandwidth_gb_s": bandwidth / 1e9, "fraction_of_copy": bandwidth / copy,
        }));
    }

    // Phase breakdown: the same step with one phase of every fused layer left out (timing only:
    // the results are wrong), at the breakdown context.
    let mut breakdown = Vec::new();
    if args.breakdown_context > 0 {
        let context = args.breakdown_context;
        for slot in 0..args.breakdown_batch {
            let id = slot as u32;
            engine.start_sequence(
                slot,
                &prompt(context),
                8,
                &SamplingParams::greedy(),
                id,
                false,
            )?;
        }
        let position = vec![context as i32; args.breakdown_batch];
        for (name, mask) in [
            ("full step", 0),
            ("qkv product", kernels::SKIP_QKV),
            ("attention", kernels::SKIP_ATTENTION),
            ("o product", kernels::SKIP_O),
            ("gate/up product", kernels::SKIP_GATE_UP),
            ("down product", kernels::SKIP_DOWN),
            ("grid barriers", kernels::SKIP_BARRIERS),
            ("all of the above", u32::MAX),
        ] {
            engine.set_layer_knobs(LayerKnobs {
                skip_phases: mask,
                ..Default::default()
            })?;
            breakdown.push((name, decode_step_ms(&mut engine, &position, 20, args.runs)?));
        }
        for &window in &args.copy_windows {
            engine.set_layer_knobs(LayerKnobs {
                copy_window: window * 1024,
                ..Default::default()
            })?;
            let ms = decode_step_ms(&mut engine, &position, 20, args.runs)?;
            println!("copy window {window:>4} KiB per block: {ms:.4} ms/step");
        }
        engine.set_layer_knobs(LayerKnobs::default())?;
        if let Some(path) = &args.trace {
            engine.trace_layers()?;
            for _ in 0..5 {
                engine.set_positions(&position)?;
                engine.step()?;
            }
            engine.gpu().synchronize()?;
            let trace = engine.trace()?;
            print_timeline(&trace, config.layers);
            std::fs::write(path, serde_json::to_string(&trace)?)?;
        }
    }

    let prefill_s = prefill_seconds(&mut engine, &prompt(args.prefill_tokens), 5)?;

    println!(
        "device: {device}; {} weights; copy bandwidth {:.0} GB/s (read + write); decode graph {nodes} kernel nodes",
        args.quant,
        copy / 1e9
    );
    println!("weights streamed per step: {:.1} MB", weight_bytes / 1e6);
    println!(
        "{:>8} {:>10} {:>10} {:>12} {:>10} {:>8}",
        "context", "step ms", "tok/s", "MB/step", "GB/s", "of copy"
    );
    for r in &rows {
        println!(
            "{:>8} {:>10.4} {:>10.1} {:>12.1} {:>10.0} {:>7.1}%",
            r["context"].as_u64().unwrap_or(0),
            r["step_ms"].as_f64().unwrap(),
            r["tokens_per_s"].as_f64().unwrap(),
            r["bytes_per_step"].as_f64().unwrap() / 1e6,
            r["bandwidth_gb_s"].as_f64().unwrap(),
            100.0 * r["fraction_of_copy"].as_f64().unwrap()
        );
    }
    if let Some(&(_, full)) = breakdown.first() {
        println!(
            "phase breakdown at context {}, batch {} (step without the phase; cost = difference):",
            args.breakdown_context, args.breakdown_batch
        );
        for (name, ms) in &breakdown[1..] {
            println!(
                "  {name:<18} {:>8.4} ms without, costs {:>7.4} ms/step ({:>5.2} us/layer)",
                ms,
                full - ms,
                (full - ms) * 1e3 / config.layers as f64
            );
        }
    }
    println!(
        "prefill: {} tokens in {:.1} ms = {:.0} tok/s (median of 5, wall clock)",
        args.prefill_tokens,
        prefill_s * 1e3,
        args.prefill_tokens as f64 / prefill_s
    );
    if let Some(path) = args.json {
        let report = serde_json::json!({
            "device": device, "quant": args.quant, "copy_bandwidth_gb_s": copy / 1e9, "graph_kernel_nodes": nodes,
            "weight_bytes_per_step": weight_bytes, "decode": rows,
            "phase_breakdown": {"context": args.breakdown_context, "batch": args.breakdown_batch, "step_ms_without": breakdown.iter().map(|(n, ms)| (n.to_string(), serde_json::json!(ms))).collect::<serde_json::Map<_, _>>()},
            "prefill": {"tokens": args.prefill_tokens, "seconds": prefill_s, "tokens_per_s": args.prefill_tokens as f64 / prefill_s},
        });
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// Per event of a fused layer launch: when blocks reach it, in us after the layer's first block
/// started (median over layers 1.. of the median and the last block), and the layer period.
fn print_timeline(trace: &[u64], layers: usize) {
    const EVENTS: [&str; kernels::TRACE_EVENTS] = [
        "start",
        "previous done",
        "qkv A loaded",
        "qkv multiplied",
        "qkv stored",
        "kv head ready",
        "attention",
        "barrier",
        "o A loaded",
        "o multiplied",
        "o stored",
        "barrier",
        "gate/up A loaded",
        "gate/up multiplied",
        "gate/up stored",
        "barrier",
        "down A loaded",
        "down multiplied",
        "down stored",
    ];
    let per_layer = trace.len() / layers;
    let blocks = per_layer / EVENTS.len();
    let start = |l: usize| {
        (0..blocks)
            .map(|b| trace[l * per_layer + b * EVENTS.len()])
            .min()
            .unwrap_or(0)
    };
    println!(
        "fused layer timeline (us after the layer's first block starts; median over layers 1..{}):",
        layers - 1
    );
    println!(
        "{:>16} {:>14} {:>12}",
        "event", "median block", "last block"
    );
    for (e, name) in EVENTS.iter().enumerate() {
        let (mut medians, mut lasts) = (Vec::new(), Vec::new());
        for l in 1..layers {
            let t0 = start(l);
            let mut at: Vec<f64> = (0..blocks)
                .map(|b| (trace[l * per_layer + b * EVENTS.len() + e] as f64 - t0 as f64) / 1e3)
                .collect();
            lasts.push(at.iter().cloned().fold(f64::MIN, f64::max));
            medians.push(median(&mut at));
        }
        println!(
            "{name:>16} {:>14.2} {:>12.2}",
            median(&mut medians),
            median(&mut lasts)
        );
    }
    let mut periods: Vec<f64> = (1..layers - 1)
        .map(|l| (start(l + 1) - start(l)) as f64 / 1e3)
        .collect();
    println!("{:>16} {:>14.2}", "layer period", median(&mut periods));
}
