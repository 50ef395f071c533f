//! The paged KV cache: fixed blocks of 16 token positions, a host-side block allocator, and the
//! per-sequence block tables the kernels read on the device.
//!
//! Layout, per layer: K and V each [blocks, 8 kv heads, 16 positions, 128] bf16, so one block of
//! one head is 4 KiB of contiguous memory. 16 positions per block keeps the waste of a sequence's
//! last, partly filled block under 1.8 MiB (all layers) while the attention kernel reads whole
//! 256-byte rows.

use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, CudaViewMut};

use super::kernels::{BLOCK_TOKENS, KV_WIDTH};
use super::Gpu;

/// Bytes of K and V for one token position across `layers` layers.
pub fn bytes_per_position(layers: usize) -> usize {
    layers * 2 * KV_WIDTH * 2
}

pub struct KvCache {
    k: CudaSlice<u16>, // [layers, blocks, 8, 16, 128]
    v: CudaSlice<u16>,
    blocks: usize,
    free: Vec<u32>,
}

impl KvCache {
    /// A cache of `bytes` (rounded down to whole blocks) for `layers` layers.
    pub fn new(gpu: &Gpu, layers: usize, bytes: usize) -> Result<Self> {
        let blocks = bytes / (bytes_per_position(layers) * BLOCK_TOKENS);
        ensure!(
            blocks > 0,
            "a KV cache of {bytes} bytes holds no block of {BLOCK_TOKENS} positions"
        );
        let elements = layers * blocks * BLOCK_TOKENS * KV_WIDTH;
        let k = gpu
            .alloc::<u16>(elements)
            .context("allocating the KV cache (try a smaller --kv-cache-gb)")?;
        let v = gpu
            .alloc::<u16>(elements)
            .context("allocating the KV cache (try a smaller --kv-cache-gb)")?;
        Ok(Self {
            k,
            v,
            blocks,
            free: (0..blocks as u32).rev().collect(),
        })
    }

    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Whether sequences of these numbers of positions fit in the free blocks together.
    pub fn has_room(&self, positions: &[usize]) -> bool {
        positions
            .iter()
            .map(|p| p.div_ceil(BLOCK_TOKENS))
            .sum::<usize>()
            <= self.free.len()
    }

    /// Blocks for `positions` token positions, or an error saying what does not fit.
    pub fn allocate(&mut self, positions: usize) -> Result<Vec<u32>> {
        let needed = positions.div_ceil(BLOCK_TOKENS);
        ensure!(
            needed <= self.free.len(),
            "the KV cache cannot hold this request: it needs {needed} blocks ({positions} positions) and {} of {} are free; \
             raise --kv-cache-gb or shorten the request",
            self.free.len(),
            self.blocks
        );
        Ok(self.free.split_off(self.free.len() - needed))
    }

    pub fn release(&mut self, blocks: Vec<u32>) {
        self.free.extend(blocks);
    }

    /// K and V of one layer, for the kernels that write new positions and attend to them.
    pub fn layer_mut(&mut self, layer: usize) -> (CudaViewMut<'_, u16>, CudaViewMut<'_, u16>) {
        let per_layer = self.blocks * BLOCK_TOKENS * KV_WIDTH;
        let range = layer * per_layer..(layer + 1) * per_layer;
        (self.k.slice_mut(range.clone()), self.v.slice_mut(range))
    }
}
