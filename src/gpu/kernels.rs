//! Safe wrappers of the csrc kernels: each checks buffer lengths against the dims it passes,
//! then makes the one FFI call. bf16 buffers are `CudaSlice<u16>` (raw bits).

use anyhow::{ensure, Result};
use cudarc::driver::CudaSlice;

use super::device::{check, ptr, ptr_mut, Gpu};
use super::ffi;

fn fits<T>(buffer: &CudaSlice<T>, needed: usize, name: &str) -> Result<()> {
    ensure!(buffer.len() >= needed, "{name}: buffer of {} elements, launch needs {needed}", buffer.len());
    Ok(())
}

/// x[m, hidden] f32 = table[tokens[m]] ; table [vocab, hidden] bf16.
pub fn embedding(
    gpu: &Gpu,
    x: &mut CudaSlice<f32>,
    table: &CudaSlice<u16>,
    tokens: &CudaSlice<i32>,
    m: usize,
    hidden: usize,
    vocab: usize,
) -> Result<()> {
    fits(x, m * hidden, "embedding x")?;
    fits(table, vocab * hidden, "embedding table")?;
    fits(tokens, m, "embedding tokens")?;
    // SAFETY: lengths checked above; all pointers are live device buffers used on gpu.stream.
    let code = unsafe {
        ffi::bi_embedding(ptr_mut(gpu, x), ptr(gpu, table), ptr(gpu, tokens), m as i32, hidden as i32, vocab as i32, gpu.raw_stream())
    };
    check(code, "bi_embedding")
}

/// out[m, hidden] bf16 = rmsnorm(x[m, hidden] f32) * weight[hidden].
pub fn rmsnorm(
    gpu: &Gpu,
    out: &mut CudaSlice<u16>,
    x: &CudaSlice<f32>,
    weight: &CudaSlice<u16>,
    m: usize,
    hidden: usize,
    eps: f32,
) -> Result<()> {
    fits(out, m * hidden, "rmsnorm out")?;
    fits(x, m * hidden, "rmsnorm x")?;
    fits(weight, hidden, "rmsnorm weight")?;
    // SAFETY: lengths checked above; all pointers are live device buffers used on gpu.stream.
    let code = unsafe {
        ffi::bi_rmsnorm(ptr_mut(gpu, out), ptr(gpu, x), ptr(gpu, weight), m as i32, hidden as i32, eps, gpu.raw_stream())
    };
    check(code, "bi_rmsnorm")
}
