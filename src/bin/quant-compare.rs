//! INT8 weights against bf16 on the same prompts, side by side: weight bytes on the GPU, upload
//! and quantization time, prefill tok/s, decode tok/s at each batch (context held fixed) with the
//! fraction of the copy bandwidth measured in the same run, and accuracy under teacher forcing:
//! every prompt is prefilled, then bf16's greedy tokens are fed to both formats through the
//! decode graph, and the logits of every position are compared (relative L2, top-1 agreement at
//! several near-tie margins, KL(bf16 || int8), max |difference|).
//!
//!     quant-compare (--synthetic | --model DIR) [--prompts FILE] [--forced 32]
//!                   [--context 1024] [--batches 1,32] [--runs 100] [--json PATH]

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use serde::Serialize;

use braidinfer::bench::{copy_bandwidth, decode_step_ms, prefill_seconds};
use braidinfer::cli::prompt_ids;
use braidinfer::compare::{
    compare_logits, top1_agreement_by_margin, LogitAgreement, MarginAgreement,
};
use braidinfer::config::ModelConfig;
use braidinfer::gpu::kv_cache::bytes_per_position;
use braidinfer::gpu::{Engine, EngineOptions, Gpu};
use braidinfer::model::Model;
use braidinfer::model_source::{resolve_model, tokenizer_dir};
use braidinfer::quant::Quant;
use braidinfer::roofline;
use braidinfer::sampling::{argmax, SamplingParams};

/// The built-in prompts: different registers and lengths.
const PROMPTS: [&str; 8] = [
    "What is the capital of Australia, and why is it not Sydney?",
    "Write a Rust function that returns the n-th Fibonacci number without recursion.",
    "Translate into French: The library opens at nine and closes at six on weekdays.",
    "Tell a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain, step by step, how to solve 3x + 7 = 22.",
    "List five ways to reduce memory bandwidth use in a GPU kernel.",
    "Summarize the plot of Hamlet in three sentences.",
    "hi",
];

/// Near-tie margins (logits) the top-1 agreement is reported at; the headline uses the second.
const MARGINS: [f32; 4] = [0.0, 0.05, 0.2, 0.5];

#[derive(Parser)]
#[command(about = "INT8 against bf16: memory, speed and accuracy on the same prompts")]
struct Args {
    /// Model directory or Hugging Face id.
    #[arg(long, conflicts_with = "synthetic")]
    model: Option<String>,
    /// Seeded synthetic weights of the real shapes (with the real tokenizer).
    #[arg(long)]
    synthetic: bool,
    /// Decoder layers of the synthetic model.
    #[arg(long, default_value_t = 28)]
    layers: usize,
    /// Tokenizer directory for --synthetic.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// One prompt per line instead of the built-in set.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Teacher-forced decode steps per prompt.
    #[arg(long, default_value_t = 32)]
    forced: usize,
    /// Context the decode speed is measured at.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batches: Vec<usize>,
    /// Graph replays timed per decode figure (median).
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Prompt length of the prefill figure.
    #[arg(long, default_value_t = 2000)]
    prefill_tokens: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Decode {
    batch: usize,
    step_ms: f64,
    tokens_per_s: f64,
    fraction_of_copy: f64,
}

#[derive(Serialize)]
struct Speed {
    quant: Quant,
    device_weight_bytes: usize,
    weight_bytes_per_step: usize,
    load_seconds: f64,
    prefill_tokens_per_s: f64,
    decode: Vec<Decode>,
}

/// One format's run: its speed, the logits of every prompt and forced position (`[vocab]` each),
/// and the tokens it was forced through per prompt.
struct Evaluation {
    speed: Speed,
    logits: Vec<Vec<f32>>,
    tokens: Vec<Vec<u32>>,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn load(args: &Args) -> Result<Model> {
    match (&args.model, args.synthetic) {
        (None, false) => bail!("pass --synthetic or --model DIR"),
        (Some(spec), _) => Model::load(&resolve_model(spec)?),
        (None, true) => {
            ensure!(args.layers > 0, "--layers must be at least 1");
            let dir = tokenizer_dir(args.tokenizer.as_deref())?;
            let config = ModelConfig {
                layers: args.layers,
                ..ModelConfig::qwen3_0_6b()
            };
            Model::synthetic(config, 0, &dir)
        }
    }
}

fn prompt_texts(args: &Args) -> Result<Vec<String>> {
    let texts: Vec<String> = match &args.prompts {
        None => PROMPTS.iter().map(|p| p.to_string()).collect(),
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading --prompts {}", path.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
    };
    ensure!(!texts.is_empty(), "no prompts");
    Ok(texts)
}

fn run(args: Args) -> Result<()> {
    ensure!(
        args.runs > 0 && args.forced > 0,
        "--runs and --forced must be positive"
    );
    ensure!(
        !args.batches.is_empty() && args.batches.iter().all(|&b| b > 0) && args.context > 0,
        "--batches and --context take positive numbers"
    );
    let model = load(&args)?;
    let prompts = prompt_texts(&args)?
        .iter()
        .map(|text| prompt_ids(&model, text, false, true))
        .collect::<Result<Vec<_>>>()?;
    let gpu = Gpu::open().context("quant-compare needs an NVIDIA GPU")?;
    let device = gpu.name();
    let copy = copy_bandwidth(&gpu)?;
    drop(gpu);

    // bf16 first: its greedy tokens are what both formats are forced through.
    let bf16 = evaluate(&args, &model, Quant::Bf16, &prompts, None, copy)?;
    let int8 = evaluate(
        &args,
        &model,
        Quant::Int8,
        &prompts,
        Some(&bf16.tokens),
        copy,
    )?;
    let agreement = compare_logits(&bf16.logits, &int8.logits, MARGINS[1]);
    let by_margin = top1_agreement_by_margin(&bf16.logits, &int8.logits, &MARGINS);

    print_table(
        &device,
        copy,
        &args,
        &[&bf16.speed, &int8.speed],
        &agreement,
        &by_margin,
    );
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "device": device, "copy_bandwidth_gb_s": copy / 1e9, "context": args.context,
            "prompts": prompts.len(), "forced_steps": args.forced,
            "bf16": bf16.speed, "int8": int8.speed, "accuracy": agreement, "top1_by_margin": by_margin,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One format, forced through `forced` tokens (its own greedy picks when None).
fn evaluate(
    args: &Args,
    model: &Model,
    quant: Quant,
    prompts: &[Vec<u32>],
    forced: Option<&[Vec<u32>]>,
    copy: f64,
) -> Result<Evaluation> {
    let config = &model.config;
    let max_batch = *args.batches.iter().max().unwrap_or(&1);
    let longest_prompt = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let positions = args
        .context
        .max(args.prefill_tokens)
        .max(longest_prompt + args.forced)
        + 16;
    let options = EngineOptions {
        max_batch,
        kv_cache_bytes: Some(max_batch * positions * bytes_per_position(config.layers)),
        quant,
        ..Default::default()
    };
    let mut engine = Engine::new(Gpu::open()?, config, &model.weights, &options)?;
    engine.capture()?;
    let (device_weight_bytes, load_seconds) = engine.weight_footprint();
    let v = config.vocab;

    let mut logits = Vec::new();
    let mut tokens_used = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let prefill = engine
            .start_sequence(
                0,
                prompt,
                args.forced + 1,
                &SamplingParams::greedy(),
                i as u32,
                true,
            )?
            .context("prefill returned no logits")?;
        logits.extend(prefill.chunks_exact(v).map(<[f32]>::to_vec));
        let mut tokens = Vec::with_capacity(args.forced);
        for step in 0..args.forced {
            let last = logits.last().context("no logits")?;
            let token = match forced {
                Some(f) => f[i][step],
                None => argmax(last) as u32,
            };
            tokens.push(token);
            engine.set_tokens(&[token as i32])?;
            engine.step()?;
            logits.push(engine.gpu().download(engine.logits())?[..v].to_vec());
        }
        engine.finish_sequence(0)?;
        tokens_used.push(tokens);
    }

    let prefill_prompt: Vec<u32> = (0..args.prefill_tokens as u32)
        .map(|i| (i * 7919) % 150_000)
        .collect();
    let prefill_tokens_per_s =
        args.prefill_tokens as f64 / prefill_seconds(&mut engine, &prefill_prompt, 3)?;

    let weight_bytes = engine.weight_bytes_per_step();
    let mut decode = Vec::new();
    for &batch in &args.batches {
        for slot in 0..batch {
            engine.start_sequence(
                slot,
                &[1],
                args.context + 8,
                &SamplingParams::greedy(),
                slot as u32,
                false,
            )?;
        }
        let step_ms = decode_step_ms(
            &mut engine,
            &vec![args.context as i32; batch],
            10,
            args.runs,
        )?;
        for slot in 0..batch {
            engine.finish_sequence(slot)?;
        }
        let bytes = roofline::step_bytes(config, weight_bytes as f64, batch, args.context);
        decode.push(Decode {
            batch,
            step_ms,
            tokens_per_s: batch as f64 * 1e3 / step_ms,
            fraction_of_copy: bytes / (step_ms * 1e-3) / copy,
        });
    }
    let speed = Speed {
        quant,
        device_weight_bytes,
        weight_bytes_per_step: weight_bytes,
        load_seconds,
        prefill_tokens_per_s,
        decode,
    };
    Ok(Evaluation {
        speed,
        logits,
        tokens: tokens_used,
    })
}

fn print_table(
    device: &str,
    copy: f64,
    args: &Args,
    speeds: &[&Speed; 2],
    agreement: &LogitAgreement,
    by_margin: &[MarginAgreement],
) {
    println!(
        "device: {device}; copy bandwidth {:.0} GB/s (read + write); decode at context {}",
        copy / 1e9,
        args.context
    );
    let row = |name: &str, f: &dyn Fn(&Speed) -> String| {
        println!("{name:<34} {:>14} {:>14}", f(speeds[0]), f(speeds[1]));
    };
    row("", &|s| s.quant.to_string());
    row("weights on the GPU (MB)", &|s| {
        format!("{:.1}", s.device_weight_bytes as f64 / 1e6)
    });
    row("weights streamed per step (MB)", &|s| {
        format!("{:.1}", s.weight_bytes_per_step as f64 / 1e6)
    });
    row("upload + quantize (s)", &|s| {
        format!("{:.2}", s.load_seconds)
    });
    row(
        &format!("prefill {} tokens (tok/s)", args.prefill_tokens),
        &|s| format!("{:.0}", s.prefill_tokens_per_s),
    );
    for (i, &batch) in args.batches.iter().enumerate() {
        row(&format!("decode batch {batch} (tok/s)"), &|s| {
            format!("{:.0}", s.decode[i].tokens_per_s)
        });
        row(&format!("decode batch {batch}, of copy bandwidth"), &|s| {
            format!("{:.1}%", 100.0 * s.decode[i].fraction_of_copy)
        });
    }
    println!(
        "int8 decode speed-up at batch {}: {:.2}x",
        args.batches[0],
        speeds[1].decode[0].tokens_per_s / speeds[0].decode[0].tokens_per_s
    );
    println!(
        "accuracy under teacher forcing ({} positions): relative L2 of logits mean {:.2e} / max {:.2e}; \
         KL(bf16 || int8) mean {:.2e} / max {:.2e} nats; max |logit difference| {:.3}",
        agreement.positions,
        agreement.rel_l2_mean,
        agreement.rel_l2_max,
        agreement.kl_mean,
        agreement.kl_max,
        agreement.max_abs_diff
    );
    for m in by_margin {
        println!(
            "  top-1 agreement where bf16's top-2 margin >= {:<4}: {:>6.2}% of {} positions",
            m.margin,
            100.0 * m.top1_agreement,
            m.decided
        );
    }
}
