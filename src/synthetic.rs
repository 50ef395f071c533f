//! Seeded synthetic weights of a Qwen3 config: the real shapes (so they decode at real speed)
//! and norm weights that exercise the numerics like the real checkpoint does (q_norm/k_norm
//! spread out, with k_norm outliers near 100), plus a writer for a model directory that
//! transformers loads (config.json, model.safetensors, tokenizer files).

use std::path::Path;

use anyhow::{Context, Result};
use half::bf16;

use crate::config::ModelConfig;
use crate::rng::SplitMix64;
use crate::weights::{HostTensor, LayerWeights, ModelWeights};

/// The files of the tokenizer and chat template that a model directory carries.
pub const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

/// Every tensor draws from its own stream, so tensors can be made in parallel, reproducibly.
fn stream(seed: u64, tensor: u64) -> SplitMix64 {
    SplitMix64::new(seed ^ tensor.wrapping_mul(0xA076_1D64_78BD_642F))
}

/// A linear layer's weight: zero mean, std 1/sqrt(in), so activations keep their scale.
fn linear(seed: u64, tensor: u64, out_features: usize, in_features: usize) -> HostTensor {
    let mut rng = stream(seed, tensor);
    let std = 1.0 / (in_features as f32).sqrt();
    let data = (0..out_features * in_features)
        .map(|_| bf16::from_f32(rng.centered(std)))
        .collect();
    HostTensor::new(vec![out_features, in_features], data)
}

/// Norm weights uniform in [lo, hi), with `outliers` entries scaled up to near `outlier`.
fn norm(
    seed: u64,
    tensor: u64,
    len: usize,
    lo: f32,
    hi: f32,
    outliers: usize,
    outlier: f32,
) -> HostTensor {
    let mut rng = stream(seed, tensor);
    let mut values: Vec<f32> = (0..len).map(|_| rng.range(lo, hi)).collect();
    for _ in 0..outliers {
        let at = (rng.next_u64() % len as u64) as usize;
        values[at] = outlier * rng.range(0.6, 1.0);
    }
    HostTensor::new(vec![len], values.into_iter().map(bf16::from_f32).collect())
}

fn layer(config: &ModelConfig, seed: u64, index: usize) -> LayerWeights {
    let (h, inter, hd) = (config.hidden, config.intermediate, config.head_dim);
    let id = |k: u64| 16 * (index as u64 + 1) + k;
    // Layer 0 gets the largest k_norm outliers, as in the real checkpoint (~96 there).
    let k_outlier = if index == 0 {
        96.0
    } else {
        12.0 + (index % 5) as f32 * 4.0
    };
    LayerWeights {
        input_norm: norm(seed, id(0), h, 0.6, 1.4, 4, 6.0),
        q_proj: linear(seed, id(1), config.q_width(), h),
        k_proj: linear(seed, id(2), config.kv_width(), h),
        v_proj: linear(seed, id(3), config.kv_width(), h),
        o_proj: linear(seed, id(4), h, config.q_width()),
        q_norm: norm(seed, id(5), hd, 0.2, 0.6, 2, 2.0),
        k_norm: norm(seed, id(6), hd, 0.3, 1.0, 3, k_outlier),
        post_norm: norm(seed, id(7), h, 0.6, 1.4, 4, 6.0),
        gate_proj: linear(seed, id(8), inter, h),
        up_proj: linear(seed, id(9), inter, h),
        down_proj: linear(seed, id(10), h, inter),
    }
}

/// Seeded weights for `config`; the same seed gives the same bits.
pub fn synthetic_weights(config: &ModelConfig, seed: u64) -> ModelWeights {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(config.layers.max(1));
    let per_thread = config.layers.div_ceil(threads).max(1);
    let mut layers: Vec<Option<LayerWeights>> = vec![None; config.layers];
    std::thread::scope(|scope| {
        for (worker, chunk) in layers.chunks_mut(per_thread).enumerate() {
            let first = worker * per_thread;
            scope.spawn(move || {
                for (offset, slot) in chunk.iter_mut().enumerate() {
                    *slot = Some(layer(config, seed, first + offset));
                }
            });
        }
    });
    let mut rng = stream(seed, 1);
    let embed = (0..config.vocab * config.hidden)
        .map(|_| bf16::from_f32(rng.centered(0.04)))
        .collect();
    ModelWeights {
        embed: HostTensor::new(vec![config.vocab, config.hidden], embed),
        layers: layers
            .into_iter()
            .map(|l| l.expect("every layer generated"))
            .collect(),
        final_norm: norm(seed, 2, config.hidden, 1.5, 3.5, 4, 8.0),
        lm_head: None,
    }
}

/// Writes `dir/config.json`, `dir/model.safetensors` and the tokenizer files from `tokenizer_dir`.
pub fn write_model_dir(
    dir: &Path,
    config: &ModelConfig,
    weights: &ModelWeights,
    tokenizer_dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config_json = serde_json::to_string_pretty(&config.to_json())?;
    std::fs::write(dir.join("config.json"), config_json)
        .with_context(|| format!("writing {}/config.json", dir.display()))?;
    weights.save(&dir.join("model.safetensors"))?;
    for file in TOKENIZER_FILES {
        let from = tokenizer_dir.join(file);
        std::fs::copy(&from, dir.join(file))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}
