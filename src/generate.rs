//! The generation loop, over any decoder (the CUDA graph runner or the CPU reference).

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use crate::reference::{CpuCache, CpuModel};
use crate::sampling::{sample, SamplingParams};

/// Produces tokens for one sequence.
pub trait Decoder {
    /// The most positions (prompt + generated) a sequence may hold.
    fn context_limit(&self) -> usize;
    /// Runs the prompt and returns the first generated token.
    fn start(&mut self, prompt: &[u32]) -> Result<u32>;
    /// Returns the next generated token.
    fn next_token(&mut self) -> Result<u32>;
}

#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt processing up to the first generated token.
    pub time_to_first_token: Duration,
    /// Everything after the first token.
    pub decode_time: Duration,
    pub stopped_on_eos: bool,
}

impl GenerationStats {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.time_to_first_token.as_secs_f64().max(1e-9)
    }

    pub fn decode_tokens_per_second(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Checks that `prompt` fits the decoder's context with room for one generated token.
pub fn check_prompt_fits(prompt_tokens: usize, context_limit: usize) -> Result<()> {
    ensure!(prompt_tokens > 0, "the prompt is empty");
    ensure!(
        prompt_tokens < context_limit,
        "the prompt is {prompt_tokens} tokens, which leaves no room in the context limit of {context_limit} tokens"
    );
    Ok(())
}

/// Generates up to `max_tokens` (fewer if the context fills), stopping after an `eos` token;
/// every token, the stop token included, goes to `on_token` as soon as it is known.
pub fn generate(
    decoder: &mut dyn Decoder,
    prompt: &[u32],
    max_tokens: usize,
    eos: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenerationStats> {
    ensure!(max_tokens > 0, "max-tokens must be at least 1");
    check_prompt_fits(prompt.len(), decoder.context_limit())?;
    let budget = max_tokens.min(decoder.context_limit() - prompt.len());
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let started = Instant::now();
    let mut token = decoder.start(prompt)?;
    stats.time_to_first_token = started.elapsed();
    let decode_started = Instant::now();
    loop {
        stats.generated_tokens += 1;
        on_token(token)?;
        if eos.contains(&token) {
            stats.stopped_on_eos = true;
            break;
        }
        if stats.generated_tokens == budget {
            break;
        }
        token = decoder.next_token()?;
    }
    stats.decode_time = decode_started.elapsed();
    Ok(stats)
}

/// The CPU reference as a decoder: host sampling over its f32 logits.
pub struct CpuDecoder<'a> {
    model: &'a CpuModel,
    cache: CpuCache,
    params: SamplingParams,
    sequence: u32,
    last: u32,
    step: u32,
}

impl<'a> CpuDecoder<'a> {
    pub fn new(model: &'a CpuModel, params: SamplingParams) -> Self {
        Self::for_sequence(model, params, 0)
    }

    /// A decoder that samples as sequence `sequence` (see `sampling::sample`).
    pub fn for_sequence(model: &'a CpuModel, params: SamplingParams, sequence: u32) -> Self {
        Self {
            model,
            cache: model.new_cache(),
            params,
            sequence,
            last: 0,
            step: 0,
        }
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        let token = sample(logits, &self.params, self.sequence, self.step);
        self.step += 1;
        self.last = token;
        token
    }
}

impl Decoder for CpuDecoder<'_> {
    fn context_limit(&self) -> usize {
        self.model.config().max_positions
    }

    fn start(&mut self, prompt: &[u32]) -> Result<u32> {
        self.cache = self.model.new_cache();
        self.step = 0;
        let mut logits = Vec::new();
        for &token in prompt {
            logits = self.model.forward(token, &mut self.cache)?;
        }
        Ok(self.pick(&logits))
    }

    fn next_token(&mut self) -> Result<u32> {
        let logits = self.model.forward(self.last, &mut self.cache)?;
        Ok(self.pick(&logits))
    }
}
