//! Teacher-forced logits of the GPU engine for a token sequence, for scripts/parity.py: the
//! first `--prompt-len` tokens go through prefill, every later token through one replay of the
//! decode graph. Writes [tokens, vocab] little-endian f32 to `--out`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use clap::Parser;

use braidinfer::config::ModelConfig;
use braidinfer::gpu::{Engine, EngineOptions, Gpu};
use braidinfer::sampling::SamplingParams;
use braidinfer::weights::ModelWeights;

#[derive(Parser)]
struct Args {
    /// Model directory (config.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// JSON list of token ids.
    #[arg(long)]
    tokens: PathBuf,
    /// How many of the tokens are the prompt; the rest are teacher-forced decode steps.
    #[arg(long)]
    prompt_len: usize,
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let config = ModelConfig::from_file(&args.model.join("config.json"))?;
    let weights = ModelWeights::load(&args.model, &config)?;
    let tokens: Vec<u32> =
        serde_json::from_str(&std::fs::read_to_string(&args.tokens).context("reading --tokens")?)?;
    ensure!(
        args.prompt_len >= 1 && args.prompt_len <= tokens.len(),
        "--prompt-len outside the token list"
    );
    let mut engine = Engine::new(Gpu::open()?, &config, &weights, &EngineOptions::default())?;
    engine.capture()?;
    let (prompt, forced) = tokens.split_at(args.prompt_len);
    let mut logits = engine
        .start_sequence(
            0,
            prompt,
            forced.len() + 1,
            &SamplingParams::greedy(),
            0,
            true,
        )?
        .context("prefill returned no logits")?;
    for &token in forced {
        engine.set_tokens(&[token as i32])?;
        engine.step()?;
        logits.extend(engine.gpu().download(engine.logits())?);
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args.out)?);
    for value in logits {
        out.write_all(&value.to_le_bytes())?;
    }
    out.flush()?;
    Ok(())
}
