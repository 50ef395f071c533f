//! Sampling on the device: parameters in the device's form, and the sampler.

use anyhow::Result;
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::{dim, fits, p, pm, MAX_TOP_K, SAMPLE_CHUNKS};
use crate::gpu::device::{check, Gpu};
use crate::gpu::ffi;

pub use crate::gpu::ffi::bi_sampling_params as SamplingParamsRaw;

/// The device's form of sampling parameters for the request `sequence` (its Philox stream).
pub fn sampling_params_raw(
    params: &crate::sampling::SamplingParams,
    sequence: u32,
) -> SamplingParamsRaw {
    SamplingParamsRaw {
        temperature: params.temperature,
        top_k: params.top_k as i32,
        top_p: params.top_p,
        seed_lo: params.seed as u32,
        seed_hi: (params.seed >> 32) as u32,
        sequence,
    }
}

/// The sampler's device state for `batch` rows.
pub struct SampleState<'a, I: DevicePtrMut<i32>, U: DevicePtrMut<u32>> {
    pub tokens: &'a mut I,    // [batch] out: the sampled token
    pub positions: &'a mut I, // [batch] advanced by one; negative rows are skipped
    pub steps: &'a mut U,     // [batch] advanced by one
}

/// Samples one token per row of logits [batch, vocab] f32 on the device.
#[allow(clippy::too_many_arguments)]
pub fn sample<I: DevicePtrMut<i32>, U: DevicePtrMut<u32>>(
    gpu: &Gpu,
    state: SampleState<'_, I, U>,
    cand_values: &mut impl DevicePtrMut<f32>,
    cand_ids: &mut impl DevicePtrMut<i32>,
    logits: &impl DevicePtr<f32>,
    params: &impl DevicePtr<SamplingParamsRaw>,
    batch: usize,
    vocab: usize,
) -> Result<()> {
    fits(state.tokens, batch, "sample tokens")?;
    fits(state.positions, batch, "sample positions")?;
    fits(state.steps, batch, "sample steps")?;
    fits(
        cand_values,
        batch * SAMPLE_CHUNKS * MAX_TOP_K,
        "sample candidates",
    )?;
    fits(
        cand_ids,
        batch * SAMPLE_CHUNKS * MAX_TOP_K,
        "sample candidates",
    )?;
    fits(logits, batch * vocab, "sample logits")?;
    fits(params, batch, "sample params")?;
    let (b, v) = (dim(batch, "batch")?, dim(vocab, "vocab")?);
    // SAFETY: lengths checked above; all pointers are live device buffers used on gpu.stream.
    let code = unsafe {
        ffi::bi_sample(
            pm(gpu, state.tokens),
            pm(gpu, state.positions),
            pm(gpu, state.steps),
            pm(gpu, cand_values),
            pm(gpu, cand_ids),
            p(gpu, logits),
            p(gpu, params),
            b,
            v,
            gpu.raw_stream(),
        )
    };
    check(code, "bi_sample")
}
