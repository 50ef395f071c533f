//! The model's weights on the GPU, in the layouts the kernels read: q/k/v stacked into one
//! matrix, gate/up rows interleaved (row 2i gate_i, row 2i+1 up_i) for the fused SwiGLU. With
//! `Quant::Int8`, every linear layer and the LM head are quantized on the GPU right after their
//! bf16 upload; norms and the embedding stay bf16.

use std::time::Instant;

use anyhow::{ensure, Result};
use cudarc::driver::CudaSlice;

use super::kernels::{Matrix, MatrixRef, HEAD_DIM, HIDDEN, INTERMEDIATE, KV_HEADS, Q_HEADS};
use super::Gpu;
use crate::config::ModelConfig;
use crate::quant::Quant;
use crate::weights::{HostTensor, ModelWeights};

pub struct DeviceLayer {
    pub input_norm: CudaSlice<u16>, // [1024]
    pub qkv: Matrix,                // [4096, 1024]: q 2048 rows | k 1024 | v 1024
    pub q_norm: CudaSlice<u16>,     // [128]
    pub k_norm: CudaSlice<u16>,     // [128]
    pub o: Matrix,                  // [1024, 2048]
    pub post_norm: CudaSlice<u16>,  // [1024]
    pub gate_up: Matrix,            // [6144, 1024], gate and up rows interleaved
    pub down: Matrix,               // [1024, 3072]
}

impl DeviceLayer {
    fn bytes(&self) -> usize {
        let norms =
            self.input_norm.len() + self.q_norm.len() + self.k_norm.len() + self.post_norm.len();
        self.qkv.bytes() + self.o.bytes() + self.gate_up.bytes() + self.down.bytes() + 2 * norms
    }
}

pub struct DeviceWeights {
    pub quant: Quant,
    pub embed: CudaSlice<u16>, // [vocab, 1024] bf16
    pub layers: Vec<DeviceLayer>,
    pub final_norm: CudaSlice<u16>, // [1024]
    /// None: tied to `embed` (bf16 only; INT8 holds its own quantized copy).
    pub lm_head: Option<Matrix>, // [vocab, 1024]
    pub rope_inv_freq: CudaSlice<f32>, // [64]
    /// Weight bytes a decode step streams: every layer, the final norm and the LM head (the
    /// embedding gather reads only a few rows).
    pub step_bytes: usize,
    /// Weight bytes on the device, the embedding included.
    pub device_bytes: usize,
    /// Seconds the upload (and quantization) took, until the device finished.
    pub load_seconds: f64,
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
        config.vocab.is_multiple_of(16),
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
    pub fn upload(
        gpu: &Gpu,
        config: &ModelConfig,
        weights: &ModelWeights,
        quant: Quant,
    ) -> Result<Self> {
        check_kernel_shapes(config)?;
        let start = Instant::now();
        let up = |data: Vec<u16>| gpu.upload(&data);
        // A [rows, cols] matrix in the engine's format: bf16 as uploaded, or quantized on the
        // device (the bf16 copy is freed once the quantization is done).
        let matrix = |data: Vec<u16>, rows: usize, cols: usize| -> Result<Matrix> {
            let bf16 = up(data)?;
            match quant {
                Quant::Bf16 => Ok(Matrix::Bf16(bf16)),
                Quant::Int8 => Matrix::quantize(gpu, &bf16, rows, cols),
            }
        };
        let (h, q, kv, i) = (
            HIDDEN,
            Q_HEADS * HEAD_DIM,
            KV_HEADS * HEAD_DIM,
            INTERMEDIATE,
        );
        let layers = weights
            .layers
            .iter()
            .map(|l| {
                Ok(DeviceLayer {
                    input_norm: up(bits(&[&l.input_norm]))?,
                    qkv: matrix(bits(&[&l.q_proj, &l.k_proj, &l.v_proj]), q + 2 * kv, h)?,
                    q_norm: up(bits(&[&l.q_norm]))?,
                    k_norm: up(bits(&[&l.k_norm]))?,
                    o: matrix(bits(&[&l.o_proj]), h, q)?,
                    post_norm: up(bits(&[&l.post_norm]))?,
                    gate_up: matrix(interleave_rows(&l.gate_proj, &l.up_proj), 2 * i, h)?,
                    down: matrix(bits(&[&l.down_proj]), h, i)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = up(bits(&[&weights.embed]))?;
        let final_norm = up(bits(&[&weights.final_norm]))?;
        let lm_head = match (&weights.lm_head, quant) {
            (None, Quant::Bf16) => None,
            (Some(head), _) => Some(matrix(bits(&[head]), config.vocab, h)?),
            (None, Quant::Int8) => Some(Matrix::quantize(gpu, &embed, config.vocab, h)?),
        };
        let layer_bytes: usize = layers.iter().map(DeviceLayer::bytes).sum();
        let head_bytes = lm_head.as_ref().map_or(2 * embed.len(), Matrix::bytes);
        let step_bytes = layer_bytes + 2 * final_norm.len() + head_bytes;
        let device_bytes = step_bytes
            + if lm_head.is_some() {
                2 * embed.len()
            } else {
                0
            };
        let rope_inv_freq = gpu.upload(&rope_inv_freq(config))?;
        gpu.synchronize()?;
        Ok(Self {
            quant,
            embed,
            layers,
            final_norm,
            lm_head,
            rope_inv_freq,
            step_bytes,
            device_bytes,
            load_seconds: start.elapsed().as_secs_f64(),
        })
    }

    pub fn lm_head(&self) -> MatrixRef<'_> {
        self.lm_head
            .as_ref()
            .map_or(MatrixRef::Bf16(&self.embed), Matrix::view)
    }
}
