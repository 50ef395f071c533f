//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use braidinfer::config::ModelConfig;
use braidinfer::gpu::Gpu;
use braidinfer::synthetic::{synthetic_weights, write_model_dir};

/// The real Qwen3 tokenizer files (../shared beside the checkout, as in CI).
pub fn tokenizer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/qwen3-0.6b")
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("braidinfer-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a temp dir");
    dir
}

/// Small layers with the real vocabulary (so the real tokenizer's ids fit) and a distinct
/// head_dim, so that shape mix-ups show.
pub fn small_config() -> ModelConfig {
    ModelConfig {
        hidden: 64,
        intermediate: 96,
        layers: 2,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 32,
        max_positions: 512,
        ..ModelConfig::qwen3_0_6b()
    }
}

/// Writes a small synthetic model directory and returns it.
pub fn small_model_dir(name: &str, config: &ModelConfig) -> PathBuf {
    let dir = temp_dir(name);
    let weights = synthetic_weights(config, 7);
    write_model_dir(&dir, config, &weights, &tokenizer_dir()).expect("writing a small model");
    dir
}

/// The GPU, or None with a visible SKIPPED line. Where BRAIDINFER_REQUIRE_GPU is set (the GPU
/// machine's gpu-test.sh), a missing GPU fails the test instead.
pub fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match Gpu::open() {
        Ok(gpu) => Some(gpu),
        Err(e) if std::env::var_os("BRAIDINFER_REQUIRE_GPU").is_some() => {
            panic!("{test}: no GPU: {e:#}")
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: no GPU ({e:#})");
            None
        }
    }
}

/// Fresh random inputs every run; the seed is printed so that a failure can be replayed.
pub fn fresh_rng(test: &str) -> braidinfer::rng::SplitMix64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("{test}: seed {seed}");
    braidinfer::rng::SplitMix64::new(seed)
}

pub fn assert_all_finite(values: &[f32], what: &str) {
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} is {} (unwritten or broken)", values[i]);
    }
}

/// Random bf16 values (as bits) of standard deviation `std`.
pub fn random_bf16(rng: &mut braidinfer::rng::SplitMix64, n: usize, std: f32) -> Vec<u16> {
    (0..n)
        .map(|_| half::bf16::from_f32(rng.centered(std)).to_bits())
        .collect()
}

/// What device outputs are filled with before a launch: a bf16 NaN, so that an unwritten
/// element shows.
pub const POISON_BF16: u16 = 0x7FC1;

pub fn bits_to_f32(bits: &[u16]) -> Vec<f32> {
    bits.iter()
        .map(|&b| half::bf16::from_bits(b).to_f32())
        .collect()
}
