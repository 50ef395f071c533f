//! Weight matrices on the device (bf16, or INT8 with per-row scales) and the INT8 quantizer.

use anyhow::Result;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::{dim, fits, p, pm};
use crate::gpu::device::{check, Gpu};
use crate::gpu::ffi;

/// A weight matrix [rows, cols] on the device: bf16, or INT8 with one f32 scale per row (row r
/// stands for `values[r, :] * scales[r]`).
pub enum Matrix {
    Bf16(CudaSlice<u16>),
    Int8 {
        values: CudaSlice<i8>,
        scales: CudaSlice<f32>,
    },
}

impl Matrix {
    /// Bytes the matrix occupies (and a product streams).
    pub fn bytes(&self) -> usize {
        match self {
            Matrix::Bf16(values) => 2 * values.len(),
            Matrix::Int8 { values, scales } => values.len() + 4 * scales.len(),
        }
    }

    /// The bf16 matrix `w` [rows, cols] quantized to INT8 on the device (csrc/quantize.cu; the
    /// same values as `quant::Int8Matrix::quantize`).
    pub fn quantize(gpu: &Gpu, w: &CudaSlice<u16>, rows: usize, cols: usize) -> Result<Matrix> {
        let mut values = gpu.alloc::<i8>(rows * cols)?;
        let mut scales = gpu.alloc::<f32>(rows)?;
        quantize_int8(gpu, &mut values, &mut scales, w, rows, cols)?;
        Ok(Matrix::Int8 { values, scales })
    }

    /// The borrowed form the kernels take.
    pub fn view(&self) -> MatrixRef<'_> {
        match self {
            Matrix::Bf16(values) => MatrixRef::Bf16(values),
            Matrix::Int8 { values, scales } => MatrixRef::Int8 { values, scales },
        }
    }
}

/// A borrowed weight matrix: what the product kernels read.
#[derive(Clone, Copy)]
pub enum MatrixRef<'a> {
    Bf16(&'a CudaSlice<u16>),
    Int8 {
        values: &'a CudaSlice<i8>,
        scales: &'a CudaSlice<f32>,
    },
}

impl MatrixRef<'_> {
    pub(super) fn is_int8(self) -> bool {
        matches!(self, MatrixRef::Int8 { .. })
    }

    /// The FFI view, after checking the matrix holds [rows, cols].
    pub(super) fn raw(
        self,
        gpu: &Gpu,
        rows: usize,
        cols: usize,
        name: &str,
    ) -> Result<ffi::bi_matrix> {
        match self {
            MatrixRef::Bf16(values) => {
                fits(values, rows * cols, name)?;
                Ok(ffi::bi_matrix {
                    values: p(gpu, values).cast(),
                    scales: std::ptr::null(),
                })
            }
            MatrixRef::Int8 { values, scales } => {
                fits(values, rows * cols, name)?;
                fits(scales, rows, name)?;
                Ok(ffi::bi_matrix {
                    values: p(gpu, values).cast(),
                    scales: p(gpu, scales),
                })
            }
        }
    }
}

/// values `[rows, cols]` int8 and scales `[rows]` f32 = the per-row INT8 quantization of w [rows,
/// cols] bf16.
pub fn quantize_int8(
    gpu: &Gpu,
    values: &mut impl DevicePtrMut<i8>,
    scales: &mut impl DevicePtrMut<f32>,
    w: &impl DevicePtr<u16>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    fits(values, rows * cols, "quantize values")?;
    fits(scales, rows, "quantize scales")?;
    fits(w, rows * cols, "quantize w")?;
    let (ri, ci) = (dim(rows, "rows")?, dim(cols, "cols")?);
    // SAFETY: lengths checked above; all pointers are live device buffers used on gpu.stream.
    let code = unsafe {
        ffi::bi_quantize_int8(
            pm(gpu, values),
            pm(gpu, scales),
            p(gpu, w),
            ri,
            ci,
            gpu.raw_stream(),
        )
    };
    check(code, "bi_quantize_int8")
}
