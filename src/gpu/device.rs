//! The GPU: a CUDA context and the stream every kernel and copy of braidinfer runs on (a decode
//! step of many rows also runs chains of layers on sibling streams, joined back within the step).

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use super::ffi;

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

impl Gpu {
    /// Opens device 0, or says why there is no usable GPU.
    pub fn open() -> Result<Self> {
        // SAFETY: only probes whether libcuda can be loaded; no CUDA call is made yet.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!("no CUDA driver found (libcuda.so could not be loaded)");
        }
        let count = CudaContext::device_count().map_err(|e| anyhow!("no usable CUDA GPU: {e}"))?;
        if count < 1 {
            bail!("no CUDA GPU found");
        }
        let ctx = CudaContext::new(0).map_err(|e| anyhow!("opening CUDA device 0: {e}"))?;
        // Explicit ordering: cudarc's per-buffer events are not needed, and they must not be
        // recorded into captured graphs.
        // SAFETY: every buffer of braidinfer is used on `stream`, or on a sibling stream between
        // an event it waits for on `stream` and an event `stream` then waits for.
        unsafe { ctx.disable_event_tracking() };
        Self::with_new_stream(ctx)
    }

    /// The same GPU with a stream of its own, for work that may run beside this one's.
    pub fn sibling(&self) -> Result<Self> {
        Self::with_new_stream(self.ctx.clone())
    }

    fn with_new_stream(ctx: Arc<CudaContext>) -> Result<Self> {
        let stream = ctx.new_stream().context("creating a CUDA stream")?;
        Ok(Self { ctx, stream })
    }

    pub fn name(&self) -> String {
        self.ctx
            .name()
            .unwrap_or_else(|_| "unknown GPU".to_string())
    }

    pub fn multiprocessors(&self) -> Result<usize> {
        let count = self
            .ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .context("reading the SM count")?;
        Ok(count as usize)
    }

    /// The stream as the C ABI sees it.
    pub fn raw_stream(&self) -> ffi::cudaStream_t {
        self.stream.cu_stream() as ffi::cudaStream_t
    }

    pub fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(len.max(1)).with_context(|| {
            format!(
                "allocating {} bytes on the GPU",
                len * std::mem::size_of::<T>()
            )
        })
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).context("copying to the GPU")
    }

    pub fn write<T: DeviceRepr>(&self, dst: &mut CudaSlice<T>, host: &[T]) -> Result<()> {
        anyhow::ensure!(
            host.len() <= dst.len(),
            "write of {} elements into a buffer of {}",
            host.len(),
            dst.len()
        );
        let mut view = dst.slice_mut(0..host.len());
        self.stream
            .memcpy_htod(host, &mut view)
            .context("copying to the GPU")
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, src: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(src).context("copying from the GPU")
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().context("waiting for the GPU")
    }
}

/// Turns a `cudaError_t` from the C ABI into an error naming the launch.
pub fn check(code: ffi::cudaError_t, what: &str) -> Result<()> {
    if code == ffi::cudaError_cudaSuccess {
        return Ok(());
    }
    // SAFETY: bi_error_string returns a pointer to a static NUL-terminated string for any code.
    let text = unsafe { std::ffi::CStr::from_ptr(ffi::bi_error_string(code)) };
    bail!("{what}: CUDA error {code} ({})", text.to_string_lossy())
}

// SAFETY: bi_sampling_params is a #[repr(C)] struct of plain 32-bit fields (bindgen output),
// valid for any bit pattern, so it may be copied to the device as bytes.
unsafe impl DeviceRepr for ffi::bi_sampling_params {}
