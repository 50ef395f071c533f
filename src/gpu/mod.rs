//! The CUDA side of the host runtime: the bindings of csrc/braidinfer.h, the device, safe
//! wrappers of every kernel, the weights and KV cache on the device, the forward pass, and the
//! engine that captures and replays the decode step.

pub mod batch;
pub mod decoder;
pub mod device;
pub mod engine;
pub mod ffi;
pub mod forward;
pub mod kernels;
pub mod kv_cache;
pub mod prefill_plan;
pub mod weights;

pub use decoder::GpuDecoder;
pub use device::Gpu;
pub use engine::{Engine, EngineOptions};
