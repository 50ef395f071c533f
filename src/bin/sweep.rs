//! Batch-size sweep: decode step time of Qwen3-0.6B (synthetic weights, real shapes) for every
//! batch size and context asked for, against the memory and compute floors measured in the
//! same run (copy bandwidth, braidinfer's tensor-core product rate). Prints a table, and writes
//! JSON, CSV and a roofline plot (SVG or PNG) on request.
//!
//!     sweep [--batches 1,2,4,...,256] [--contexts 512] [--quant bf16|int8] [--batch-invariant] [--runs 30]
//!           [--json PATH] [--csv PATH] [--plot sweep.svg|sweep.png]

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use braidinfer::bench::{copy_bandwidth, decode_step_ms, matrix_rate};
use braidinfer::config::ModelConfig;
use braidinfer::gpu::kv_cache::bytes_per_position;
use braidinfer::gpu::{Engine, EngineOptions, Gpu};
use braidinfer::plot::{roofline_plot, PlotFormat};
use braidinfer::quant::Quant;
use braidinfer::roofline::{Point, CSV_HEADER};
use braidinfer::sampling::SamplingParams;
use braidinfer::synthetic::synthetic_weights;

#[derive(Parser)]
#[command(about = "Decode tok/s against batch size, with the roofline measured in the same run")]
struct Args {
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,8,16,32,64,128,256"
    )]
    batches: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "512")]
    contexts: Vec<usize>,
    #[arg(long, value_enum, default_value = "bf16")]
    quant: Quant,
    /// Batch-invariant decode (a sequence's logits independent of its batch and slot).
    #[arg(long)]
    batch_invariant: bool,
    /// Graph replays timed per point (median).
    #[arg(long, default_value_t = 30)]
    runs: usize,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    csv: Option<PathBuf>,
    /// SVG or PNG file (by its extension): tok/s against batch on log axes, with the roofline.
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if args.batches.iter().chain(&args.contexts).any(|&v| v == 0)
        || args.batches.is_empty()
        || args.contexts.is_empty()
    {
        bail!("--batches and --contexts take positive numbers");
    }
    if args.runs == 0 {
        bail!("--runs must be positive");
    }
    if let Some(path) = &args.plot {
        PlotFormat::of(path)?; // a wrong extension stops the sweep before it runs, not after
    }
    let gpu = Gpu::open().context("the sweep needs an NVIDIA GPU")?;
    let device = gpu.name();
    let copy = copy_bandwidth(&gpu)?;
    let rate = matrix_rate(&gpu)?;
    let config = ModelConfig::qwen3_0_6b();
    let max_batch = *args.batches.iter().max().unwrap_or(&1);
    let longest = *args.contexts.iter().max().unwrap_or(&1);
    let options = EngineOptions {
        max_batch,
        kv_cache_bytes: Some(max_batch * (longest + 32) * bytes_per_position(config.layers)),
        quant: args.quant,
        batch_invariant: args.batch_invariant,
        ..Default::default()
    };
    let mut engine = Engine::new(gpu, &config, &synthetic_weights(&config, 0), &options)?;
    engine.capture()?;
    let weight_bytes = engine.weight_bytes_per_step() as f64;

    let bar = ProgressBar::new((args.batches.len() * args.contexts.len()) as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} {msg} [{elapsed}]",
    )?);
    let mut points = Vec::new();
    for &context in &args.contexts {
        for &batch in &args.batches {
            bar.set_message(format!("batch {batch}, context {context}"));
            points.push(measure(
                &mut engine,
                &config,
                weight_bytes,
                batch,
                context,
                args.runs,
                copy,
                rate,
            )?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    println!(
        "device: {device}; weights {}{}; copy bandwidth {:.0} GB/s (read + write); bf16 matrix rate {:.0} TFLOP/s (braidinfer's tiled product, 4096x6144x1024)",
        args.quant,
        if args.batch_invariant { ", batch-invariant decode" } else { "" },
        copy / 1e9,
        rate / 1e12
    );
    println!(
        "{:>6} {:>8} {:>9} {:>10} {:>9} {:>10} {:>10} {:>10} {:>9}",
        "batch",
        "context",
        "step ms",
        "tok/s",
        "MB/step",
        "GFLOP",
        "mem floor",
        "cmp floor",
        "roofline"
    );
    for p in &points {
        println!(
            "{:>6} {:>8} {:>9.3} {:>10.0} {:>9.1} {:>10.1} {:>9.3}ms {:>9.3}ms {:>8.1}%",
            p.batch,
            p.context,
            p.step_ms,
            p.tokens_per_s,
            p.bytes_per_step / 1e6,
            p.flops_per_step / 1e9,
            p.memory_floor_ms,
            p.compute_floor_ms,
            100.0 * p.fraction_of_roofline
        );
    }
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "device": device, "quant": args.quant, "batch_invariant": args.batch_invariant, "copy_bandwidth_gb_s": copy / 1e9,
            "matrix_rate_tflop_s": rate / 1e12, "points": points,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.csv {
        let rows: Vec<String> = std::iter::once(CSV_HEADER.to_string())
            .chain(points.iter().map(Point::csv_row))
            .collect();
        std::fs::write(path, rows.join("\n") + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        roofline_plot(
            path,
            &format!("braidinfer decode, Qwen3-0.6B {}, {device}", args.quant),
            &points,
        )?;
    }
    Ok(())
}

/// Median step time of `batch` sequences held at `context` positions (their K/V blocks
/// allocated; the values do not change the work), as a roofline point.
#[allow(clippy::too_many_arguments)]
fn measure(
    engine: &mut Engine,
    config: &ModelConfig,
    weight_bytes: f64,
    batch: usize,
    context: usize,
    runs: usize,
    copy: f64,
    rate: f64,
) -> Result<Point> {
    for slot in 0..engine.max_batch() {
        engine.finish_sequence(slot)?;
    }
    for slot in 0..batch {
        engine.start_sequence(
            slot,
            &[1],
            context + 8,
            &SamplingParams::greedy(),
            slot as u32,
            false,
        )?;
    }
    let positions = vec![context as i32; batch];
    let step_ms = decode_step_ms(engine, &positions, 5, runs)?;
    Ok(Point::new(
        config,
        weight_bytes,
        batch,
        context,
        step_ms,
        copy,
        rate,
    ))
}
