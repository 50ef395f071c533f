//! The model's weights on the GPU, in the layouts the kernels read: q/k/v stacked into one
//! matrix, gate/up rows interleaved (row 2i gate_i, row 2i+1 up_i) for the fused SwiGLU.

use anyhow::{ensure, Result};
use cudarc::driver::CudaSlice;

use super::kernels::{HEAD_DIM, HIDDEN, INTERMEDIATE, KV_HEADS, Q_HEADS};
use super::Gpu;
use crate::config::ModelConfig;
use crate::weights::{HostTensor, ModelWeights};

pub struct DeviceLayer {
    pub input_norm: CudaSlice<u16>, // [1024]
    pub qkv: CudaSlice<u16>,        // [4096, 1024]: q 2048 rows | k 1024 | v 1024
    pub q_norm: CudaSlice<u16>,     // [128]
    pub k_norm: CudaSlice<u16>,     // [128]
    pub o: CudaSlice<u16>,          // [1024, 2048]
    pub post_norm: CudaSlice<u16>,  // [1024]
    pub gate_up: CudaSlice<u16>,    // [6144, 1024], gate and up rows interleaved
    pub down: CudaSlice<u16>,       // [1024, 3072]
}

pub struct DeviceWeights {
    pub embed: CudaSlice<u16>, // [vocab, 1024]
    pub layers: Vec<DeviceLayer>,
    pub final_norm: CudaSlice<u16>, // [1024]
    /// None: tied to `embed`.
    pub lm_head: Option<CudaSlice<u16>>, // [vocab, 1024]
    pub rope_inv_freq: CudaSlice<f32>, // [64]
    /// Weight bytes a decode step streams: every layer, the final norm and the LM head (the
    /// embedding gather reads only a few rows).
    pub step_bytes: usize,
}

/// Checks that `config` has the per-layer shapes the kernels are compiled for.
pub fn check_kernel_shapes(config: &ModelConfig) -> Result<()> {
    let expect = |name: &str, got: usize, want: usize| {
        ensure!(
            got == want,
            "the CUDA kernels are built for Qwen3-0.6B: {name} must be {want}, found {got}"
        );
        Ok(())
    };
    expect("hidden_size", config.hidden, HIDDEN)?;
    expect("intermediate_size", config.intermediate, INTERMEDIATE)?;
    expect("num_attention_heads", config.q_heads, Q_HEADS)?;
    expect("num_key_value_heads", config.kv_heads, KV_HEADS)?;
    expect("head_dim", config.head_dim, HEAD_DIM)?;
    ensure!(
        config.vocab % 16 == 0,
        "vocab_size must be a multiple of 16 for the LM head kernel, found {}",
        config.vocab
    );
    Ok(())
}

fn bits(tensors: &[&HostTensor]) -> Vec<u16> {
    tensors
        .iter()
        .flat_map(|t| t.data.iter().map(|v| v.to_bits()))
        .collect()
}

/// Rows of `gate` and `up` ([intermediate, hidden] each) interleaved.
fn interleave_rows(gate: &HostTensor, up: &HostTensor) -> Vec<u16> {
    let width = gate.shape[1];
    gate.data
        .chunks_exact(width)
        .zip(up.data.chunks_exact(width))
        .flat_map(|(g, u)| g.iter().chain(u).map(|v| v.to_bits()))
        .collect()
}

/// RoPE inverse frequencies, computed exactly as the CPU reference does.
pub fn rope_inv_freq(config: &ModelConfig) -> Vec<f32> {
    (0..config.head_dim / 2)
        .map(|i| {
            (1.0 / config
                .rope_theta
                .powf(2.0 * i as f64 / config.head_dim as f64)) as f32
        })
        .collect()
}

impl DeviceWeights {
    pub fn upload(gpu: &Gpu, config: &ModelConfig, weights: &ModelWeights) -> Result<Self> {
        check_kernel_shapes(config)?;
        let up = |data: Vec<u16>| gpu.upload(&data);
        let layers = weights
            .layers
            .iter()
            .map(|l| {
                Ok(DeviceLayer {
                    input_norm: up(bits(&[&l.input_norm]))?,
                    qkv: up(bits(&[&l.q_proj, &l.k_proj, &l.v_proj]))?,
                    q_norm: up(bits(&[&l.q_norm]))?,
                    k_norm: up(bits(&[&l.k_norm]))?,
                    o: up(bits(&[&l.o_proj]))?,
                    post_norm: up(bits(&[&l.post_norm]))?,
                    gate_up: up(interleave_rows(&l.gate_proj, &l.up_proj))?,
                    down: up(bits(&[&l.down_proj]))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = up(bits(&[&weights.embed]))?;
        let final_norm = up(bits(&[&weights.final_norm]))?;
        let lm_head = weights
            .lm_head
            .as_ref()
            .map(|t| up(bits(&[t])))
            .transpose()?;
        let layer_bytes: usize = weights
            .layers
            .iter()
            .map(|l| l.named().iter().map(|(_, t)| t.bytes()).sum::<usize>())
            .sum();
        let step_bytes = layer_bytes + weights.final_norm.bytes() + weights.lm_head().bytes();
        let rope_inv_freq = gpu.upload(&rope_inv_freq(config))?;
        Ok(Self {
            embed,
            layers,
            final_norm,
            lm_head,
            rope_inv_freq,
            step_bytes,
        })
    }

    pub fn lm_head(&self) -> &CudaSlice<u16> {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
