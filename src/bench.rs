//! Measurement helpers shared by the benchmarks: the device-to-device copy bandwidth of the same
//! run (the ceiling every figure is reported against) and CUDA-event timing with medians.

use std::sync::Arc;

use anyhow::{Context, Result};
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};

use crate::gpu::{Engine, Gpu};

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Times work on a GPU stream with CUDA events.
pub struct Timer {
    start: CudaEvent,
    end: CudaEvent,
    stream: Arc<CudaStream>,
}

impl Timer {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let event = |ctx: &Arc<CudaContext>| {
            ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .context("creating a CUDA event")
        };
        Ok(Self {
            start: event(&gpu.ctx)?,
            end: event(&gpu.ctx)?,
            stream: gpu.stream.clone(),
        })
    }

    /// Median milliseconds of `op(state)` over `runs` runs after `warmup`, each between two
    /// events; `prepare(state)` runs before each, outside the events.
    pub fn median_ms<S>(
        &self,
        warmup: usize,
        runs: usize,
        state: &mut S,
        mut prepare: impl FnMut(&mut S) -> Result<()>,
        mut op: impl FnMut(&mut S) -> Result<()>,
    ) -> Result<f64> {
        for _ in 0..warmup {
            prepare(state)?;
            op(state)?;
        }
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            prepare(state)?;
            self.start.record(&self.stream)?;
            op(state)?;
            self.end.record(&self.stream)?;
            times.push(self.start.elapsed_ms(&self.end)? as f64);
        }
        Ok(median(&mut times))
    }
}

/// Median milliseconds of one decode step (graph replay) of the engine's live sequences, with
/// their positions reset to `positions` before each run so the context stays fixed.
pub fn decode_step_ms(
    engine: &mut Engine,
    positions: &[i32],
    warmup: usize,
    runs: usize,
) -> Result<f64> {
    Timer::new(engine.gpu())?.median_ms(
        warmup,
        runs,
        engine,
        |e| e.set_positions(positions),
        |e| e.step(),
    )
}

/// Median wall-clock seconds of prefilling `prompt` into slot 0 (through its first sampled
/// token) over `runs` runs, each starting on an idle device; the slot is freed after each.
pub fn prefill_seconds(engine: &mut Engine, prompt: &[u32], runs: usize) -> Result<f64> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        engine.gpu().synchronize()?;
        let started = std::time::Instant::now();
        engine.start_sequence(
            0,
            prompt,
            1,
            &crate::sampling::SamplingParams::greedy(),
            0,
            false,
        )?;
        engine.gpu().synchronize()?;
        times.push(started.elapsed().as_secs_f64());
        engine.finish_sequence(0)?;
    }
    Ok(median(&mut times))
}

/// Device-to-device copy bandwidth in bytes per second, counting bytes read plus written.
pub fn copy_bandwidth(gpu: &Gpu) -> Result<f64> {
    const BYTES: usize = 1 << 30;
    let src = gpu.alloc::<u8>(BYTES)?;
    let mut dst = gpu.alloc::<u8>(BYTES)?;
    let ms = Timer::new(gpu)?.median_ms(
        3,
        20,
        &mut dst,
        |_| Ok(()),
        |dst| gpu.stream.memcpy_dtod(&src, dst).context("copying"),
    )?;
    Ok(2.0 * BYTES as f64 / (ms * 1e-3))
}

/// The bf16 tensor-core rate of braidinfer's own tiled product (the prefill kernel) on a
/// 4096 x 6144 x 1024 problem, in FLOP/s: the compute ceiling the sweep reports against.
pub fn matrix_rate(gpu: &Gpu) -> Result<f64> {
    const M: usize = 4096;
    const N: usize = 6144;
    const K: usize = 1024;
    let mut rng = crate::rng::SplitMix64::new(7);
    let mut random = |len: usize| -> Vec<u16> {
        (0..len)
            .map(|_| half::bf16::from_f32(rng.range(-1.0, 1.0)).to_bits())
            .collect()
    };
    let a = gpu.upload(&random(M * K))?;
    let w = gpu.upload(&random(N * K))?;
    let mut out = gpu.alloc::<f32>(M * N)?;
    let ms = Timer::new(gpu)?.median_ms(
        3,
        20,
        &mut out,
        |_| Ok(()),
        |out| {
            crate::gpu::kernels::linear(
                gpu,
                out,
                &a,
                crate::gpu::kernels::MatrixRef::Bf16(&w),
                (M, N, K),
                crate::gpu::kernels::Epilogue::Store,
                crate::gpu::kernels::Placement::Alone,
            )
        },
    )?;
    Ok(2.0 * (M * N * K) as f64 / (ms * 1e-3))
}
