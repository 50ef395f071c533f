//! Safe wrappers of the csrc kernels: each checks buffer lengths against the dims it passes,
//! then makes the one FFI call. Buffers are anything cudarc can point at (slices and views);
//! bf16 buffers hold raw bits (`u16`).

use anyhow::{ensure, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceSlice};

use super::device::Gpu;
use super::ffi;

mod attention;
mod embed_norm;
mod layer;
mod matrix;
mod products;
mod sampling;

pub use attention::*;
pub use embed_norm::*;
pub use layer::*;
pub use matrix::*;
pub use products::*;
pub use sampling::*;

/// Model dimensions the layer kernels are compiled for.
pub const HIDDEN: usize = ffi::BI_HIDDEN as usize;
pub const Q_HEADS: usize = ffi::BI_Q_HEADS as usize;
pub const KV_HEADS: usize = ffi::BI_KV_HEADS as usize;
pub const HEAD_DIM: usize = ffi::BI_HEAD_DIM as usize;
pub const INTERMEDIATE: usize = ffi::BI_INTERMEDIATE as usize;
pub const BLOCK_TOKENS: usize = ffi::BI_BLOCK_TOKENS as usize;
pub const PARTIAL_FLOATS: usize = ffi::BI_PARTIAL_FLOATS as usize;
pub const MAX_SPLITS: usize = ffi::BI_MAX_SPLITS as usize;
pub const FUSED_DECODE_MIN_SMS: usize = ffi::BI_FUSED_DECODE_MIN_SMS as usize;
/// Products of up to this many rows run skinny, their per-row arithmetic independent of m (the
/// layer products up to twice as many when alone: `Placement`); larger ones tiled.
pub const SKINNY_ROWS: usize = ffi::BI_SKINNY_ROWS as usize;
pub const PREFILL_TILE_ROWS: usize = ffi::BI_PREFILL_TILE_ROWS as usize;
pub const SAMPLE_CHUNKS: usize = ffi::BI_SAMPLE_CHUNKS as usize;
pub const MAX_TOP_K: usize = ffi::BI_MAX_TOP_K as usize;
pub const Q_WIDTH: usize = Q_HEADS * HEAD_DIM;
pub const KV_WIDTH: usize = KV_HEADS * HEAD_DIM;
pub const QKV_WIDTH: usize = Q_WIDTH + 2 * KV_WIDTH;

fn fits<T>(buffer: &impl DeviceSlice<T>, needed: usize, name: &str) -> Result<()> {
    ensure!(
        buffer.len() >= needed,
        "{name}: buffer of {} elements, launch needs {needed}",
        buffer.len()
    );
    Ok(())
}

fn dim(value: usize, name: &str) -> Result<i32> {
    i32::try_from(value)
        .map_err(|_| anyhow::anyhow!("{name} = {value} does not fit the kernel ABI"))
}

fn p<T>(gpu: &Gpu, buffer: &impl DevicePtr<T>) -> *const T {
    buffer.device_ptr(&gpu.stream).0 as *const T
}

fn pm<T>(gpu: &Gpu, buffer: &mut impl DevicePtrMut<T>) -> *mut T {
    buffer.device_ptr_mut(&gpu.stream).0 as *mut T
}
