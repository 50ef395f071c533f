//! The tensor-core products: `linear` and `norm_linear` (RMSNorm fused in front).

use anyhow::Result;
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::{dim, fits, p, pm, MatrixRef};
use crate::gpu::device::{check, Gpu};
use crate::gpu::ffi;

/// What `linear` does with its f32 result.
#[derive(Clone, Copy)]
pub enum Epilogue {
    /// out f32 [m, n] = a . w^T
    Store,
    /// out f32 [m, n] += a . w^T (the residual stream)
    AddResidual,
}

/// What runs beside a product, which picks the kernel of a layer product of 17-32 rows
/// (`bi_placement`): `Alone` runs it skinny, its RMSNorm fused; `BesideChain` (a decode step's
/// concurrent chains of rows) tiled.
#[derive(Clone, Copy, Debug)]
pub enum Placement {
    Alone,
    BesideChain,
}

impl Placement {
    fn raw(self) -> ffi::bi_placement {
        match self {
            Placement::Alone => ffi::bi_placement_BI_PLACEMENT_ALONE,
            Placement::BesideChain => ffi::bi_placement_BI_PLACEMENT_BESIDE_CHAIN,
        }
    }
}

/// out f32 [m, n] (= or +=) a[m, k] . w[n, k]^T on tensor cores.
pub fn linear(
    gpu: &Gpu,
    out: &mut impl DevicePtrMut<f32>,
    a: &impl DevicePtr<u16>,
    w: MatrixRef<'_>,
    (m, n, k): (usize, usize, usize),
    epilogue: Epilogue,
    placement: Placement,
) -> Result<()> {
    fits(out, m * n, "linear out")?;
    fits(a, m * k, "linear a")?;
    let w = w.raw(gpu, n, k, "linear w")?;
    let kind = match epilogue {
        Epilogue::Store => ffi::bi_epilogue_BI_EPILOGUE_STORE_F32,
        Epilogue::AddResidual => ffi::bi_epilogue_BI_EPILOGUE_ADD_RESIDUAL,
    };
    let (mi, ni, ki) = (dim(m, "m")?, dim(n, "n")?, dim(k, "k")?);
    // SAFETY: every buffer was checked against m, n and k above; pointers are live device memory.
    let code = unsafe {
        ffi::bi_linear(
            pm(gpu, out).cast(),
            p(gpu, a),
            w,
            mi,
            ni,
            ki,
            kind,
            placement.raw(),
            gpu.raw_stream(),
        )
    };
    check(code, "bi_linear")
}

/// out f32 [m, n] (= or +=) rmsnorm(x[m, k]) * norm . w[n, k]^T: RMSNorm fused in front of the
/// product (`scratch` [m, k] bf16 holds the normalized rows when the product runs tiled).
#[allow(clippy::too_many_arguments)]
pub fn norm_linear<O>(
    gpu: &Gpu,
    out: &mut impl DevicePtrMut<O>,
    x: &impl DevicePtr<f32>,
    norm: &impl DevicePtr<u16>,
    eps: f32,
    w: MatrixRef<'_>,
    scratch: &mut impl DevicePtrMut<u16>,
    (m, n, k): (usize, usize, usize),
    epilogue: NormEpilogue,
    placement: Placement,
) -> Result<()> {
    let out_len = match epilogue {
        NormEpilogue::Store => m * n,
        NormEpilogue::SwiGlu => m * n / 2,
    };
    fits(out, out_len, "norm_linear out")?;
    fits(x, m * k, "norm_linear x")?;
    fits(norm, k, "norm_linear norm")?;
    let w = w.raw(gpu, n, k, "norm_linear w")?;
    fits(scratch, m * k, "norm_linear scratch")?;
    let kind = match epilogue {
        NormEpilogue::Store => ffi::bi_epilogue_BI_EPILOGUE_STORE_F32,
        NormEpilogue::SwiGlu => ffi::bi_epilogue_BI_EPILOGUE_SWIGLU,
    };
    let (mi, ni, ki) = (dim(m, "m")?, dim(n, "n")?, dim(k, "k")?);
    // SAFETY: every buffer was checked against m, n and k above; pointers are live device memory.
    let code = unsafe {
        ffi::bi_norm_linear(
            pm(gpu, out).cast(),
            p(gpu, x),
            p(gpu, norm),
            eps,
            w,
            pm(gpu, scratch),
            mi,
            ni,
            ki,
            kind,
            placement.raw(),
            gpu.raw_stream(),
        )
    };
    check(code, "bi_norm_linear")
}

/// What `norm_linear` writes: f32 [m, n] (`out` holds f32), or the SwiGLU of interleaved
/// gate/up rows as bf16 [m, n / 2] (`out` holds u16 bits).
#[derive(Clone, Copy)]
pub enum NormEpilogue {
    Store,
    SwiGlu,
}
