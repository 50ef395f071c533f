//! Answering: one prompt streamed token by token, or a file of prompts generated together
//! (each answer printed whole when it finishes), on the GPU engine or the CPU reference.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{open_gpu, prompt_ids, Args};
use crate::batch::{generate_batch, BatchDecoder, BatchEvent, CpuBatch, Request};
use crate::generate::{check_prompt_fits, generate, CpuDecoder, Decoder, GenerationStats};
use crate::gpu::{Engine, EngineOptions, Gpu, GpuDecoder};
use crate::model::Model;
use crate::reference::CpuModel;
use crate::sampling::SamplingParams;
use crate::tokenizer::StreamDecoder;

/// Streams the answer to one prompt (`params` validated).
pub(super) fn answer_one(
    args: &Args,
    model: &Model,
    params: SamplingParams,
    text: &str,
    max_tokens: usize,
) -> Result<()> {
    let prompt = prompt_ids(model, text, args.raw, args.no_think)?;
    let (label, stats) = match open_gpu(args.backend)? {
        Some(gpu) => {
            let label = gpu_label(&gpu, args);
            let engine = capture_engine(gpu, args, model, 1)?;
            let mut decoder = GpuDecoder::new(engine, params, max_tokens)?;
            check_prompt_fits(prompt.len(), decoder.context_limit())?;
            (
                label,
                stream_answer(model, &mut decoder, &prompt, max_tokens)?,
            )
        }
        None => {
            let cpu = CpuModel::new(&model.config, &model.weights).with_weights(args.quant);
            let mut decoder = CpuDecoder::new(&cpu, params);
            check_prompt_fits(prompt.len(), decoder.context_limit())?;
            (
                "CPU reference".to_string(),
                stream_answer(model, &mut decoder, &prompt, max_tokens)?,
            )
        }
    };
    if args.stats {
        print_stats(&stats, &label);
    }
    Ok(())
}

/// Answers every prompt, up to --batch decoded together, each printed whole when it finishes
/// (`params` validated).
pub(super) fn answer_many(
    args: &Args,
    model: &Model,
    params: SamplingParams,
    texts: &[String],
    max_tokens: usize,
) -> Result<()> {
    let requests = texts
        .iter()
        .map(|text| {
            Ok(Request {
                prompt: prompt_ids(model, text, args.raw, args.no_think)?,
                max_tokens,
                params,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let slots = args.batch.min(requests.len());
    let (label, (stats, elapsed)) = match open_gpu(args.backend)? {
        Some(gpu) => {
            let label = gpu_label(&gpu, args);
            let mut engine = capture_engine(gpu, args, model, slots)?;
            (label, print_answers(model, &mut engine, &requests)?)
        }
        None => {
            let cpu = CpuModel::new(&model.config, &model.weights).with_weights(args.quant);
            let mut batch = CpuBatch::new(&cpu, slots);
            (
                "CPU reference".to_string(),
                print_answers(model, &mut batch, &requests)?,
            )
        }
    };
    if args.stats {
        print_batch_stats(&stats, &label, slots, elapsed);
    }
    Ok(())
}

fn gpu_label(gpu: &Gpu, args: &Args) -> String {
    format!("{}, {} weights", gpu.name(), args.quant)
}

/// The engine for up to `max_batch` sequences, its decode steps captured.
fn capture_engine(gpu: Gpu, args: &Args, model: &Model, max_batch: usize) -> Result<Engine> {
    let options = EngineOptions {
        max_batch,
        kv_cache_bytes: args.kv_cache_gb.map(|gb| (gb * 1e9) as usize),
        quant: args.quant,
        ..EngineOptions::default()
    };
    let mut engine = Engine::new(gpu, &model.config, &model.weights, &options)?;
    engine.capture()?;
    Ok(engine)
}

fn stream_answer(
    model: &Model,
    decoder: &mut dyn Decoder,
    prompt: &[u32],
    max_tokens: usize,
) -> Result<GenerationStats> {
    let mut text = StreamDecoder::new(&model.tokenizer);
    let mut stdout = std::io::stdout().lock();
    let stats = generate(
        decoder,
        prompt,
        max_tokens,
        &model.generation.eos_tokens,
        |token| {
            if let Some(piece) = text.push(token)? {
                stdout
                    .write_all(piece.as_bytes())
                    .context("writing to stdout")?;
                stdout.flush().context("writing to stdout")?;
            }
            Ok(())
        },
    )?;
    let rest = text.finish()?;
    writeln!(stdout, "{rest}").context("writing to stdout")?;
    Ok(stats)
}

/// Generates every request on `decoder`, printing each answer whole as it finishes; returns the
/// stats and the time it all took.
fn print_answers(
    model: &Model,
    decoder: &mut dyn BatchDecoder,
    requests: &[Request],
) -> Result<(Vec<GenerationStats>, Duration)> {
    let mut answers = vec![Vec::new(); requests.len()];
    let mut stdout = std::io::stdout().lock();
    let started = Instant::now();
    let stats = generate_batch(
        decoder,
        requests,
        &model.generation.eos_tokens,
        |event| match event {
            BatchEvent::Token { request, token } => {
                answers[request].push(token);
                Ok(())
            }
            BatchEvent::Finished { request, .. } => {
                let text = model.tokenizer.decode(&answers[request])?;
                writeln!(stdout, "### answer {} of {}", request + 1, requests.len())
                    .and_then(|_| writeln!(stdout, "{text}\n"))
                    .and_then(|_| stdout.flush())
                    .context("writing to stdout")
            }
        },
    )?;
    Ok((stats, started.elapsed()))
}

fn print_batch_stats(stats: &[GenerationStats], backend: &str, slots: usize, elapsed: Duration) {
    let prompt_tokens: usize = stats.iter().map(|s| s.prompt_tokens).sum();
    let generated: usize = stats.iter().map(|s| s.generated_tokens).sum();
    let first_token_ms: Vec<f64> = stats
        .iter()
        .map(|s| s.time_to_first_token.as_secs_f64() * 1e3)
        .collect();
    eprintln!(
        "[{backend}] {} prompts ({prompt_tokens} tokens), up to {slots} decoded together: \
         {generated} tokens generated in {:.2} s, {:.1} tok/s overall (prefill included); \
         time to first token {:.1}-{:.1} ms",
        stats.len(),
        elapsed.as_secs_f64(),
        generated as f64 / elapsed.as_secs_f64().max(1e-9),
        first_token_ms.iter().copied().fold(f64::INFINITY, f64::min),
        first_token_ms.iter().copied().fold(0.0, f64::max),
    );
}

fn print_stats(stats: &GenerationStats, backend: &str) {
    eprintln!(
        "[{backend}] prompt {} tokens, prefill {:.1} tok/s, time to first token {:.1} ms, \
         {} tokens generated at {:.1} tok/s{}",
        stats.prompt_tokens,
        stats.prefill_tokens_per_second(),
        stats.time_to_first_token.as_secs_f64() * 1e3,
        stats.generated_tokens,
        stats.decode_tokens_per_second(),
        if stats.stopped_on_eos {
            " (stopped at end of turn)"
        } else {
            ""
        }
    );
}
