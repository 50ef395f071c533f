//! Starting and finishing sequences: KV blocks allocated, prompts prefilled (several packed
//! into shared passes, `prefill_plan`), first tokens sampled on the device.

use anyhow::{ensure, Result};

use super::Engine;
use crate::batch::SequenceStart;
use crate::gpu::kernels::{self, SampleState, MAX_TOP_K, SAMPLE_CHUNKS};
use crate::gpu::prefill_plan;
use crate::sampling::SamplingParams;

impl Engine {
    /// Starts a sequence in `slot`: KV blocks for `prompt.len() + max_new_tokens` positions,
    /// the prompt prefilled, and its first token sampled on the device (the next step's input).
    /// With `all_logits`, returns the logits of every prompt position [prompt, vocab].
    pub fn start_sequence(
        &mut self,
        slot: usize,
        prompt: &[u32],
        max_new_tokens: usize,
        params: &SamplingParams,
        sequence_id: u32,
        all_logits: bool,
    ) -> Result<Option<Vec<f32>>> {
        let start = SequenceStart {
            slot,
            prompt,
            max_new_tokens,
            params: *params,
            sequence: sequence_id,
        };
        self.start(&[start], all_logits)
    }

    /// Starts sequences in distinct slots as `start_sequence` does, their prompts prefilled
    /// together: packed back to back into shared prefill passes, and the last positions' LM
    /// heads run on up to PROMPT_LOGITS_ROWS rows at once. Nothing starts unless the KV cache
    /// holds them all.
    pub fn start_sequences(&mut self, starts: &[SequenceStart]) -> Result<()> {
        self.start(starts, false).map(drop)
    }

    fn start(&mut self, starts: &[SequenceStart], all_logits: bool) -> Result<Option<Vec<f32>>> {
        ensure!(!starts.is_empty(), "no sequence to start");
        ensure!(
            !all_logits || starts.len() == 1,
            "all prompt logits are kept for one sequence at a time"
        );
        for (i, s) in starts.iter().enumerate() {
            self.check_start(s)?;
            ensure!(
                starts[..i].iter().all(|other| other.slot != s.slot),
                "slot {} is started twice",
                s.slot
            );
        }
        for s in starts {
            self.finish_sequence(s.slot)?;
        }
        let mut allocated = Vec::with_capacity(starts.len());
        for s in starts {
            match self
                .cache
                .allocate((s.prompt.len() + s.max_new_tokens).min(self.context_limit))
            {
                Ok(blocks) => allocated.push(blocks),
                Err(e) => {
                    allocated.into_iter().for_each(|b| self.cache.release(b));
                    return Err(e);
                }
            }
        }
        for (s, blocks) in starts.iter().zip(allocated) {
            let mut table: Vec<i32> = blocks.iter().map(|&b| b as i32).collect();
            table.resize(self.forward.max_blocks, 0);
            let mut row = self.forward.block_tables.slice_mut(
                s.slot * self.forward.max_blocks..(s.slot + 1) * self.forward.max_blocks,
            );
            self.forward.gpu.stream.memcpy_htod(&table, &mut row)?;
            self.slots[s.slot] = Some(blocks);
        }
        let prompt_logits = self.prefill(starts, all_logits)?;
        for s in starts {
            self.sample_first_token(s)?;
        }
        Ok(prompt_logits)
    }

    /// What can be checked of a start before anything runs.
    fn check_start(&self, s: &SequenceStart) -> Result<()> {
        ensure!(
            s.slot < self.slots.len(),
            "slot {} outside the batch of {}",
            s.slot,
            self.slots.len()
        );
        ensure!(!s.prompt.is_empty(), "the prompt is empty");
        ensure!(
            s.prompt.len() < self.context_limit,
            "the prompt is {} tokens, which leaves no room in the context limit of {} tokens",
            s.prompt.len(),
            self.context_limit
        );
        if let Some(&bad) = s
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.forward.config.vocab)
        {
            anyhow::bail!(
                "token id {bad} is outside the vocabulary ({})",
                self.forward.config.vocab
            );
        }
        s.params.validate()
    }

    /// Samples the first token of a started sequence from the logits of its prompt's last
    /// position (in `self.logits`), and sets its decode state.
    fn sample_first_token(&mut self, s: &SequenceStart) -> Result<()> {
        let (slot, v) = (s.slot, self.forward.config.vocab);
        self.forward.gpu.stream.memcpy_htod(
            &[kernels::sampling_params_raw(&s.params, s.sequence)],
            &mut self.params.slice_mut(slot..slot + 1),
        )?;
        self.forward.gpu.stream.memcpy_htod(
            &[s.prompt.len() as i32 - 1],
            &mut self.decode.positions.slice_mut(slot..slot + 1),
        )?;
        self.forward
            .gpu
            .stream
            .memcpy_htod(&[0u32], &mut self.steps.slice_mut(slot..slot + 1))?;
        let state = SampleState {
            tokens: &mut self.decode.tokens.slice_mut(slot..slot + 1),
            positions: &mut self.decode.positions.slice_mut(slot..slot + 1),
            steps: &mut self.steps.slice_mut(slot..slot + 1),
        };
        let cand = slot * SAMPLE_CHUNKS * MAX_TOP_K..(slot + 1) * SAMPLE_CHUNKS * MAX_TOP_K;
        kernels::sample(
            &self.forward.gpu,
            state,
            &mut self.cand_values.slice_mut(cand.clone()),
            &mut self.cand_ids.slice_mut(cand),
            &self.logits.slice(slot * v..(slot + 1) * v),
            &self.params.slice(slot..slot + 1),
            1,
            v,
        )
    }

    /// Runs the prompts through every layer in packed passes (`prefill_plan`), writing their
    /// K/V; leaves the logits of each prompt's last position in `self.logits[slot]`. With
    /// `all_logits` (one prompt), returns the logits of all its positions.
    fn prefill(&mut self, starts: &[SequenceStart], all_logits: bool) -> Result<Option<Vec<f32>>> {
        let v = self.forward.config.vocab;
        let lens: Vec<usize> = starts.iter().map(|s| s.prompt.len()).collect();
        let mut collected = all_logits.then(|| Vec::with_capacity(lens[0] * v));
        let mut pass_logits = if all_logits {
            Some(self.forward.gpu.alloc::<f32>(self.prefill.rows * v)?)
        } else {
            None
        };
        for pass in prefill_plan::plan(&lens, self.prefill.rows) {
            let m = prefill_plan::rows(&pass);
            let (mut ids, mut positions, mut row_seq) =
                (vec![0i32; m], vec![0i32; m], vec![0i32; m]);
            for piece in &pass {
                let s = &starts[piece.prompt];
                let tokens = &s.prompt[piece.position..piece.position + piece.len];
                for (i, &t) in tokens.iter().enumerate() {
                    ids[piece.row + i] = t as i32;
                    positions[piece.row + i] = (piece.position + i) as i32;
                    row_seq[piece.row + i] = s.slot as i32;
                }
            }
            self.forward.gpu.write(&mut self.prefill.tokens, &ids)?;
            self.forward
                .gpu
                .write(&mut self.prefill.positions, &positions)?;
            self.forward
                .gpu
                .write(&mut self.prefill.row_seq, &row_seq)?;
            self.prefill_tiles
                .write(&self.forward.gpu, &prefill_plan::tiles(&pass))?;
            self.forward.prefill_layers(
                &mut self.prefill,
                &mut self.cache,
                m,
                &self.prefill_tiles,
            )?;
            // The last rows of the prompts that end in this pass.
            let ends: Vec<(usize, usize)> = pass
                .iter()
                .filter(|p| p.position + p.len == lens[p.prompt])
                .map(|p| (p.row + p.len - 1, starts[p.prompt].slot))
                .collect();
            if let (Some(all), Some(buffer)) = (collected.as_mut(), pass_logits.as_mut()) {
                // One prompt, every row's logits kept: its last row's are among them.
                self.forward.logits(&mut self.prefill, 0, m, buffer)?;
                all.extend_from_slice(&self.forward.gpu.download(buffer)?[..m * v]);
                for &(row, slot) in &ends {
                    self.forward.gpu.stream.memcpy_dtod(
                        &buffer.slice(row * v..(row + 1) * v),
                        &mut self.logits.slice_mut(slot * v..(slot + 1) * v),
                    )?;
                }
                continue;
            }
            // LM heads over up to PROMPT_LOGITS_ROWS last rows at a time (gathered into the
            // decode buffers, which are scratch between steps), each row's logits then copied
            // to its slot.
            for group in ends.chunks(self.prompt_logits.len() / v) {
                let rows: Vec<usize> = group.iter().map(|&(row, _)| row).collect();
                self.forward
                    .gather_rows(&self.prefill, &rows, &mut self.decode)?;
                self.forward
                    .logits(&mut self.decode, 0, rows.len(), &mut self.prompt_logits)?;
                for (i, &(_, slot)) in group.iter().enumerate() {
                    self.forward.gpu.stream.memcpy_dtod(
                        &self.prompt_logits.slice(i * v..(i + 1) * v),
                        &mut self.logits.slice_mut(slot * v..(slot + 1) * v),
                    )?;
                }
            }
        }
        Ok(collected)
    }

    /// Whether sequences of these numbers of positions fit in the KV cache together, beside the
    /// live ones.
    pub fn has_room(&self, positions: &[usize]) -> bool {
        self.cache.has_room(positions)
    }

    /// Frees the KV blocks of the sequence in `slot` (if any); the slot idles until restarted.
    pub fn finish_sequence(&mut self, slot: usize) -> Result<()> {
        if let Some(blocks) = self.slots[slot].take() {
            self.cache.release(blocks);
        }
        self.forward.gpu.stream.memcpy_htod(
            &[-1i32],
            &mut self.decode.positions.slice_mut(slot..slot + 1),
        )?;
        Ok(())
    }
}
