//! The GPU engine's slots as a `BatchDecoder`: every live slot advances in one graph replay,
//! and the sampled tokens come back to the host once per step.

use anyhow::Result;

use super::Engine;
use crate::batch::BatchDecoder;
use crate::sampling::SamplingParams;

impl BatchDecoder for Engine {
    fn slots(&self) -> usize {
        self.max_batch()
    }

    fn context_limit(&self) -> usize {
        Engine::context_limit(self)
    }

    fn has_room(&self, positions: usize) -> bool {
        Engine::has_room(self, positions)
    }

    fn start(
        &mut self,
        slot: usize,
        prompt: &[u32],
        max_new_tokens: usize,
        params: &SamplingParams,
        sequence: u32,
    ) -> Result<()> {
        self.start_sequence(slot, prompt, max_new_tokens, params, sequence, false)?;
        Ok(())
    }

    fn finish(&mut self, slot: usize) -> Result<()> {
        self.finish_sequence(slot)
    }

    fn step(&mut self) -> Result<()> {
        Engine::step(self)
    }

    fn tokens(&mut self) -> Result<Vec<u32>> {
        let tokens = self.gpu().download(Engine::tokens(self))?;
        Ok(tokens.into_iter().map(|t| t as u32).collect())
    }
}
