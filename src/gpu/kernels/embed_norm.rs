//! The embedding gather and the RMSNorm of rows.

use anyhow::Result;
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::{dim, fits, p, pm};
use crate::gpu::device::{check, Gpu};
use crate::gpu::ffi;

/// `x[m, hidden]` f32 = `table[tokens[m]]`; table `[vocab, hidden]` bf16.
pub fn embedding(
    gpu: &Gpu,
    x: &mut impl DevicePtrMut<f32>,
    table: &impl DevicePtr<u16>,
    tokens: &impl DevicePtr<i32>,
    m: usize,
    hidden: usize,
    vocab: usize,
) -> Result<()> {
    fits(x, m * hidden, "embedding x")?;
    fits(table, vocab * hidden, "embedding table")?;
    fits(tokens, m, "embedding tokens")?;
    let (mi, hi, vi) = (dim(m, "m")?, dim(hidden, "hidden")?, dim(vocab, "vocab")?);
    // SAFETY: lengths checked above; all pointers are live device buffers used on gpu.stream.
    let code = unsafe {
        ffi::bi_embedding(
            pm(gpu, x),
            p(gpu, table),
            p(gpu, tokens),
            mi,
            hi,
            vi,
            gpu.raw_stream(),
        )
    };
    check(code, "bi_embedding")
}

/// `out[m, hidden]` bf16 = rmsnorm(`x[m, hidden]` f32) * `weight[hidden]`.
pub fn rmsnorm(
    gpu: &Gpu,
    out: &mut impl DevicePtrMut<u16>,
    x: &impl DevicePtr<f32>,
    weight: &impl DevicePtr<u16>,
    m: usize,
    hidden: usize,
    eps: f32,
) -> Result<()> {
    fits(out, m * hidden, "rmsnorm out")?;
    fits(x, m * hidden, "rmsnorm x")?;
    fits(weight, hidden, "rmsnorm weight")?;
    let (mi, hi) = (dim(m, "m")?, dim(hidden, "hidden")?);
    // SAFETY: lengths checked above; all pointers are live device buffers used on gpu.stream.
    let code = unsafe {
        ffi::bi_rmsnorm(
            pm(gpu, out),
            p(gpu, x),
            p(gpu, weight),
            mi,
            hi,
            eps,
            gpu.raw_stream(),
        )
    };
    check(code, "bi_rmsnorm")
}
