//! Sampling parameters and the host sampler. The device sampler (csrc/sampling.cu) follows the
//! same steps with the same random draw, so both pick the same token from the same logits.
//!
//! Steps: temperature 0 is greedy (argmax, lowest id on ties). Otherwise keep the `top_k`
//! largest logits (ties: lower id first), softmax them at `temperature`, keep the shortest
//! prefix whose probability reaches `top_p`, and draw from it with the Philox uniform of
//! (seed, sequence, step).

use anyhow::{ensure, Result};

use crate::rng::sampling_uniform;

/// The largest top-k the device sampler keeps per sequence.
pub const MAX_TOP_K: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 1,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// Checks the ranges; every entry point calls this before generating.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be >= 0 (0 = greedy), got {}",
            self.temperature
        );
        ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top-p must be in (0, 1], got {}",
            self.top_p
        );
        ensure!(
            (1..=MAX_TOP_K).contains(&self.top_k),
            "top-k must be between 1 and {MAX_TOP_K}, got {} (top-k 1 or temperature 0 is greedy)",
            self.top_k
        );
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// Index of the largest value; the lowest index wins ties. NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// The `k` largest logits as (id, logit), in decreasing order, lower id first on ties.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut order: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v))
        .collect();
    let k = k.min(order.len());
    let by_rank = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k < order.len() {
        order.select_nth_unstable_by(k, by_rank);
        order.truncate(k);
    }
    order.sort_by(by_rank);
    order
}

/// The candidates that survive top-k and top-p, with their unnormalized probabilities.
pub fn candidates(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f32)> {
    let kept = top_k(logits, params.top_k);
    let max = kept[0].1;
    let weights: Vec<f32> = kept
        .iter()
        .map(|&(_, v)| ((v - max) / params.temperature).exp())
        .collect();
    let total: f32 = weights.iter().sum();
    let mut cumulative = 0.0;
    let mut out = Vec::new();
    for (&(id, _), &w) in kept.iter().zip(&weights) {
        out.push((id, w));
        cumulative += w;
        if cumulative >= params.top_p * total {
            break;
        }
    }
    out
}

/// Picks the next token for `sequence` at decode `step`.
pub fn sample(logits: &[f32], params: &SamplingParams, sequence: u32, step: u32) -> u32 {
    if params.is_greedy() {
        return argmax(logits);
    }
    let kept = candidates(logits, params);
    let total: f32 = kept.iter().map(|&(_, w)| w).sum();
    let target = sampling_uniform(params.seed, sequence, step) * total;
    let mut cumulative = 0.0;
    for &(id, w) in &kept {
        cumulative += w;
        if target < cumulative {
            return id;
        }
    }
    kept[kept.len() - 1].0
}
