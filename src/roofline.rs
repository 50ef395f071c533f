//! What a decode step must move and compute, and the floors those put under its time: the
//! memory floor (bytes over the copy bandwidth) and the compute floor (FLOPs over a matrix
//! rate), both measured in the same run. The sweep binary and the decode benchmark report
//! against them.

use serde::Serialize;

use crate::config::ModelConfig;
use crate::gpu::kv_cache::bytes_per_position;

/// Bytes one decode step moves: the weights once, each sequence's K/V of positions
/// 0..=context read, and its new K/V row written.
pub fn step_bytes(config: &ModelConfig, weight_bytes: f64, batch: usize, context: usize) -> f64 {
    let per_position = bytes_per_position(config.layers) as f64;
    weight_bytes + batch as f64 * (context + 2) as f64 * per_position
}

/// FLOPs of one decode step: two per weight of every product (LM head included) per row, and
/// attention's scores and weighted sum over context + 1 positions for every query head.
pub fn step_flops(config: &ModelConfig, batch: usize, context: usize) -> f64 {
    let (h, q, kv) = (
        config.hidden,
        config.q_heads * config.head_dim,
        config.kv_heads * config.head_dim,
    );
    let per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate;
    let products = 2.0 * (config.layers * per_layer + config.vocab * h) as f64;
    let attention = (config.layers * config.q_heads * config.head_dim * 4 * (context + 1)) as f64;
    batch as f64 * (products + attention)
}

/// One measured point of a sweep.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub batch: usize,
    pub context: usize,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    pub bytes_per_step: f64,
    pub flops_per_step: f64,
    pub memory_floor_ms: f64,
    pub compute_floor_ms: f64,
    /// The larger floor over the measured step time.
    pub fraction_of_roofline: f64,
}

impl Point {
    /// `copy`: bytes/s (read + write), `matrix_rate`: FLOP/s.
    pub fn new(
        config: &ModelConfig,
        weight_bytes: f64,
        batch: usize,
        context: usize,
        step_ms: f64,
        copy: f64,
        matrix_rate: f64,
    ) -> Self {
        let bytes = step_bytes(config, weight_bytes, batch, context);
        let flops = step_flops(config, batch, context);
        let (memory_floor_ms, compute_floor_ms) = (bytes / copy * 1e3, flops / matrix_rate * 1e3);
        Self {
            batch,
            context,
            step_ms,
            tokens_per_s: batch as f64 / (step_ms * 1e-3),
            bytes_per_step: bytes,
            flops_per_step: flops,
            memory_floor_ms,
            compute_floor_ms,
            fraction_of_roofline: memory_floor_ms.max(compute_floor_ms) / step_ms,
        }
    }

    /// tok/s at the roofline (the larger floor).
    pub fn roofline_tokens_per_s(&self) -> f64 {
        self.batch as f64 / (self.memory_floor_ms.max(self.compute_floor_ms) * 1e-3)
    }
}

pub const CSV_HEADER: &str =
    "batch,context,step_ms,tokens_per_s,bytes_per_step,flops_per_step,memory_floor_ms,compute_floor_ms,fraction_of_roofline";

impl Point {
    pub fn csv_row(&self) -> String {
        format!(
            "{},{},{:.5},{:.1},{:.0},{:.0},{:.5},{:.5},{:.4}",
            self.batch,
            self.context,
            self.step_ms,
            self.tokens_per_s,
            self.bytes_per_step,
            self.flops_per_step,
            self.memory_floor_ms,
            self.compute_floor_ms,
            self.fraction_of_roofline
        )
    }
}
