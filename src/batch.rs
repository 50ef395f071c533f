//! Batched generation: many requests decoded together, one token per live sequence per step,
//! over any `BatchDecoder` (the GPU engine's slots, or the CPU reference). A sequence that
//! finishes frees its slot for the next waiting request at once (continuous batching), so the
//! batch stays full while requests remain.

use std::time::Instant;

use anyhow::{ensure, Context, Result};

use crate::generate::{check_prompt_fits, CpuDecoder, Decoder, GenerationStats};
use crate::reference::CpuModel;
use crate::sampling::SamplingParams;

/// One sequence to generate: its prompt's token ids, at most `max_tokens` new tokens (fewer if
/// the context fills or an end token comes), sampled with `params`.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
}

/// A sequence to start in a free slot: its prompt prefilled, with room for `max_new_tokens`
/// after it, and its first token sampled (`sequence` seeds its sampling, as in
/// `sampling::sample`).
#[derive(Clone, Copy, Debug)]
pub struct SequenceStart<'a> {
    pub slot: usize,
    pub prompt: &'a [u32],
    pub max_new_tokens: usize,
    pub params: SamplingParams,
    pub sequence: u32,
}

/// What `generate_batch` reports, as it happens.
pub enum BatchEvent<'a> {
    /// Request `request` produced `token` (an end token included).
    Token { request: usize, token: u32 },
    /// Request `request` is done; its slot goes to the next waiting request.
    Finished {
        request: usize,
        stats: &'a GenerationStats,
    },
}

/// Sequences decoded together in slots, one token per live slot per step.
pub trait BatchDecoder {
    /// Sequences it decodes at once.
    fn slots(&self) -> usize;
    /// The most positions (prompt + generated) a sequence may hold.
    fn context_limit(&self) -> usize;
    /// Whether sequences of these numbers of positions fit together beside the live ones now.
    fn has_room(&self, positions: &[usize]) -> bool;
    /// Starts these sequences (their prompts prefilled together where the decoder can).
    fn start(&mut self, starts: &[SequenceStart]) -> Result<()>;
    /// Ends the sequence in `slot`, freeing its room.
    fn finish(&mut self, slot: usize) -> Result<()>;
    /// Samples the next token of every live sequence.
    fn step(&mut self) -> Result<()>;
    /// The token each slot sampled last `[slots]` (meaningful for live slots only).
    fn tokens(&mut self) -> Result<Vec<u32>>;
}

/// A live sequence: its request, its token budget and when its prefill began.
#[derive(Clone, Copy)]
struct Live {
    request: usize,
    budget: usize,
    started: Instant,
}

/// Generates every request (request i samples as sequence i), up to `decoder.slots()` at a
/// time, stopping each after an `eos` token or its budget; events go to `on_event` as soon as
/// they are known. Returns each request's stats: time to first token from the start of its
/// prefill. Every request is checked before any runs; after an error, the sequences still
/// live are finished, so the decoder's slots are free again.
pub fn generate_batch(
    decoder: &mut dyn BatchDecoder,
    requests: &[Request],
    eos: &[u32],
    on_event: impl FnMut(BatchEvent) -> Result<()>,
) -> Result<Vec<GenerationStats>> {
    let limit = decoder.context_limit();
    for (i, r) in requests.iter().enumerate() {
        let checked = ensure_positive(r.max_tokens)
            .and_then(|_| check_prompt_fits(r.prompt.len(), limit))
            .and_then(|_| r.params.validate());
        checked.with_context(|| format!("request {}", i + 1))?;
    }
    let mut live: Vec<Option<Live>> = vec![None; decoder.slots()];
    let generated = run_requests(decoder, requests, eos, &mut live, on_event);
    if generated.is_err() {
        for (slot, sequence) in live.iter().enumerate() {
            if sequence.is_some() {
                // The first error is the one to report.
                let _ = decoder.finish(slot);
            }
        }
    }
    generated
}

/// `generate_batch`'s loop over checked requests, with `live` holding each slot's sequence.
fn run_requests(
    decoder: &mut dyn BatchDecoder,
    requests: &[Request],
    eos: &[u32],
    live: &mut [Option<Live>],
    mut on_event: impl FnMut(BatchEvent) -> Result<()>,
) -> Result<Vec<GenerationStats>> {
    let limit = decoder.context_limit();
    let budget = |r: &Request| r.max_tokens.min(limit - r.prompt.len());
    let mut stats: Vec<GenerationStats> = requests
        .iter()
        .map(|r| GenerationStats {
            prompt_tokens: r.prompt.len(),
            ..Default::default()
        })
        .collect();
    let mut next = 0; // the first request not started
    loop {
        // The waiting requests that the free slots and the room take, started together. A
        // request that does not fit waits for others to finish; alone, `start` says why it can
        // never fit.
        let (mut starts, mut sizes) = (Vec::new(), Vec::new());
        for (slot, _) in live.iter().enumerate().filter(|(_, l)| l.is_none()) {
            let Some(r) = requests.get(next) else {
                break;
            };
            sizes.push(r.prompt.len() + budget(r));
            let busy = live.iter().any(Option::is_some) || !starts.is_empty();
            if busy && !decoder.has_room(&sizes) {
                break;
            }
            starts.push(SequenceStart {
                slot,
                prompt: &r.prompt,
                max_new_tokens: budget(r),
                params: r.params,
                sequence: next as u32,
            });
            next += 1;
        }
        if !starts.is_empty() {
            let started = Instant::now();
            let first = next - starts.len();
            decoder.start(&starts).with_context(|| {
                let ids: Vec<String> = (first..next).map(|i| (i + 1).to_string()).collect();
                format!("request {}", ids.join(", "))
            })?;
            for (i, start) in starts.iter().enumerate() {
                live[start.slot] = Some(Live {
                    request: first + i,
                    budget: start.max_new_tokens,
                    started,
                });
            }
        }
        if live.iter().all(Option::is_none) {
            return Ok(stats);
        }
        let tokens = decoder.tokens()?;
        for (slot, token) in tokens.into_iter().enumerate().take(live.len()) {
            let Some(sequence) = live[slot] else {
                continue;
            };
            let s = &mut stats[sequence.request];
            s.generated_tokens += 1;
            if s.generated_tokens == 1 {
                s.time_to_first_token = sequence.started.elapsed();
            }
            on_event(BatchEvent::Token {
                request: sequence.request,
                token,
            })?;
            let stopped = eos.contains(&token);
            if stopped || s.generated_tokens == sequence.budget {
                s.stopped_on_eos = stopped;
                s.decode_time = sequence.started.elapsed() - s.time_to_first_token;
                decoder.finish(slot)?;
                live[slot] = None;
                on_event(BatchEvent::Finished {
                    request: sequence.request,
                    stats: s,
                })?;
            }
        }
        if live.iter().any(Option::is_some) {
            decoder.step()?;
        }
    }
}

fn ensure_positive(max_tokens: usize) -> Result<()> {
    ensure!(max_tokens > 0, "max-tokens must be at least 1");
    Ok(())
}

/// The CPU reference as a batch decoder: one `CpuDecoder` per slot, stepped in turn.
pub struct CpuBatch<'a> {
    model: &'a CpuModel,
    slots: Vec<Option<(CpuDecoder<'a>, u32)>>, // each live slot's decoder and last token
}

impl<'a> CpuBatch<'a> {
    pub fn new(model: &'a CpuModel, slots: usize) -> Self {
        Self {
            model,
            slots: (0..slots).map(|_| None).collect(),
        }
    }
}

impl BatchDecoder for CpuBatch<'_> {
    fn slots(&self) -> usize {
        self.slots.len()
    }

    fn context_limit(&self) -> usize {
        self.model.config().max_positions
    }

    fn has_room(&self, _positions: &[usize]) -> bool {
        true // the CPU caches grow as needed
    }

    fn start(&mut self, starts: &[SequenceStart]) -> Result<()> {
        for s in starts {
            let mut decoder = CpuDecoder::for_sequence(self.model, s.params, s.sequence);
            let first = decoder.start(s.prompt)?;
            self.slots[s.slot] = Some((decoder, first));
        }
        Ok(())
    }

    fn finish(&mut self, slot: usize) -> Result<()> {
        self.slots[slot] = None;
        Ok(())
    }

    fn step(&mut self) -> Result<()> {
        for (decoder, last) in self.slots.iter_mut().flatten() {
            *last = decoder.next_token()?;
        }
        Ok(())
    }

    fn tokens(&mut self) -> Result<Vec<u32>> {
        Ok(self
            .slots
            .iter()
            .map(|s| s.as_ref().map_or(0, |(_, last)| *last))
            .collect())
    }
}
