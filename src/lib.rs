//! braidinfer: Qwen3-0.6B inference with hand-written CUDA C++ kernels (compiled ahead of time by
//! build.rs) and the whole decode step replayed as one CUDA graph.
//!
//! Data flow: prompt -> chat template -> token ids -> prefill -> decode steps -> sampled ids ->
//! streaming detokenization (`generate` for one sequence, `batch` for many decoded together).
//! `reference` is the f32 CPU oracle every kernel is tested against.

pub mod batch;
pub mod bench;
pub mod cli;
pub mod compare;
pub mod config;
pub mod generate;
pub mod gpu;
pub mod model;
pub mod model_source;
pub mod plot;
pub mod quant;
pub mod reference;
pub mod rng;
pub mod roofline;
pub mod sampling;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;
