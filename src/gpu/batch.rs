//! The GPU engine's slots as a `BatchDecoder`: sequences started together share prefill passes,
//! every live slot advances in one graph replay, and the sampled tokens come back to the host
//! once per step.

use anyhow::Result;

use super::Engine;
use crate::batch::{BatchDecoder, SequenceStart};

impl BatchDecoder for Engine {
    fn slots(&self) -> usize {
        self.max_batch()
    }

    fn context_limit(&self) -> usize {
        Engine::context_limit(self)
    }

    fn has_room(&self, positions: &[usize]) -> bool {
        Engine::has_room(self, positions)
    }

    fn start(&mut self, starts: &[SequenceStart]) -> Result<()> {
        self.start_sequences(starts)
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
