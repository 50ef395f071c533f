//! The GPU engine as a single-sequence `Decoder` for the CLI, one step ahead: the next decode
//! step is launched before the host waits for the token of the current one, so the GPU never
//! idles on the host's detokenization and printing.

use anyhow::{Context, Result};
use cudarc::driver::{CudaEvent, PinnedHostSlice};

use super::engine::Engine;
use crate::generate::Decoder;
use crate::sampling::SamplingParams;

pub struct GpuDecoder {
    engine: Engine,
    params: SamplingParams,
    max_new_tokens: usize,
    /// Tokens copied back, alternating: slot i % 2 holds token i until it is delivered; its
    /// event marks the end of the copy (recorded here: cudarc records pinned-buffer events only
    /// when it tracks streams, which the engine turns off).
    landing: [PinnedHostSlice<i32>; 2],
    landed: [CudaEvent; 2],
    launched: usize,
    delivered: usize,
    /// Tokens this sequence may produce (its KV blocks).
    limit: usize,
}

impl GpuDecoder {
    pub fn new(engine: Engine, params: SamplingParams, max_new_tokens: usize) -> Result<Self> {
        let ctx = engine.gpu().ctx.clone();
        // SAFETY: page-locked host memory of plain i32; it is only read through as_slice(),
        // which waits for the copy that fills it.
        let pin = || {
            unsafe { ctx.alloc_pinned_with_flags::<i32>(1, 0) }.context("allocating pinned memory")
        };
        let landing = [pin()?, pin()?];
        let event = || ctx.new_event(None).context("creating a CUDA event");
        let landed = [event()?, event()?];
        Ok(Self {
            engine,
            params,
            max_new_tokens,
            landing,
            landed,
            launched: 0,
            delivered: 0,
            limit: 0,
        })
    }

    /// Enqueues the copy of the token the last launch produced.
    fn land(&mut self) -> Result<()> {
        let slot = self.launched % 2;
        let engine = &self.engine;
        engine
            .gpu()
            .stream
            .memcpy_dtoh(&engine.tokens().slice(0..1), &mut self.landing[slot])?;
        self.landed[slot].record(&engine.gpu().stream)?;
        self.launched += 1;
        Ok(())
    }

    fn launch_next(&mut self) -> Result<()> {
        if self.launched < self.limit {
            self.engine.step()?;
            self.land()?;
        }
        Ok(())
    }

    fn deliver(&mut self) -> Result<u32> {
        let slot = self.delivered % 2;
        self.landed[slot]
            .synchronize()
            .context("waiting for the GPU")?;
        let token = self.landing[slot].as_slice().context("reading a token")?[0];
        self.delivered += 1;
        Ok(token as u32)
    }
}

impl Decoder for GpuDecoder {
    fn context_limit(&self) -> usize {
        self.engine.context_limit()
    }

    fn start(&mut self, prompt: &[u32]) -> Result<u32> {
        self.engine
            .start_sequence(0, prompt, self.max_new_tokens, &self.params, 0, false)?;
        self.limit = self
            .max_new_tokens
            .min(self.engine.context_limit() - prompt.len());
        self.launched = 0;
        self.delivered = 0;
        self.land()?; // token 0, sampled at the end of prefill
        self.launch_next()?;
        self.deliver()
    }

    fn next_token(&mut self) -> Result<u32> {
        anyhow::ensure!(
            self.delivered < self.limit,
            "the sequence has used all of its KV blocks"
        );
        self.launch_next()?;
        self.deliver()
    }
}
