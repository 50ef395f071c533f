//! The CPU reference forward pass: f32 everywhere, one token at a time, for any Qwen3 config.
//! Readable rather than fast; it is the oracle the CUDA kernels are tested against, and it lets
//! CI run the whole generation pipeline on a small model.

use anyhow::{ensure, Result};

use crate::config::ModelConfig;
use crate::quant::{int8_round_trip, Quant};
use crate::weights::{LayerWeights, ModelWeights};

struct CpuLayer {
    input_norm: Vec<f32>, // [hidden]
    q_proj: Vec<f32>,     // [q_heads * head_dim, hidden]
    k_proj: Vec<f32>,     // [kv_heads * head_dim, hidden]
    v_proj: Vec<f32>,     // [kv_heads * head_dim, hidden]
    o_proj: Vec<f32>,     // [hidden, q_heads * head_dim]
    q_norm: Vec<f32>,     // [head_dim]
    k_norm: Vec<f32>,     // [head_dim]
    post_norm: Vec<f32>,  // [hidden]
    gate_proj: Vec<f32>,  // [intermediate, hidden]
    up_proj: Vec<f32>,    // [intermediate, hidden]
    down_proj: Vec<f32>,  // [hidden, intermediate]
}

impl CpuLayer {
    fn new(w: &LayerWeights) -> Self {
        Self {
            input_norm: w.input_norm.to_f32(),
            q_proj: w.q_proj.to_f32(),
            k_proj: w.k_proj.to_f32(),
            v_proj: w.v_proj.to_f32(),
            o_proj: w.o_proj.to_f32(),
            q_norm: w.q_norm.to_f32(),
            k_norm: w.k_norm.to_f32(),
            post_norm: w.post_norm.to_f32(),
            gate_proj: w.gate_proj.to_f32(),
            up_proj: w.up_proj.to_f32(),
            down_proj: w.down_proj.to_f32(),
        }
    }
}

pub struct CpuModel {
    config: ModelConfig,
    /// Round activations to bf16 where the CUDA kernels store them (norm outputs, q/k/v,
    /// attention output, SwiGLU output); the residual stream stays f32. Off: all f32.
    bf16_activations: bool,
    embed: Vec<f32>, // [vocab, hidden]
    layers: Vec<CpuLayer>,
    final_norm: Vec<f32>,      // [hidden]
    lm_head: Option<Vec<f32>>, // [vocab, hidden]; None: tied to embed
}

/// Keys and values of every position so far, per layer: [positions, kv_heads * head_dim].
pub struct CpuCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

impl CpuCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl CpuModel {
    pub fn new(config: &ModelConfig, weights: &ModelWeights) -> Self {
        Self {
            config: config.clone(),
            bf16_activations: false,
            embed: weights.embed.to_f32(),
            layers: weights.layers.iter().map(CpuLayer::new).collect(),
            final_norm: weights.final_norm.to_f32(),
            lm_head: weights.lm_head.as_ref().map(|t| t.to_f32()),
        }
    }

    /// The same model, rounding activations to bf16 where the GPU does: a tight oracle for the
    /// GPU path, whose remaining differences are summation order.
    pub fn with_bf16_activations(mut self) -> Self {
        self.bf16_activations = true;
        self
    }

    /// The same model with its weights as `quant` stores them: unchanged for bf16; for INT8,
    /// every linear layer's weights (the LM head included, the embedding gather not) through a
    /// symmetric per-channel INT8 round trip, which is what the INT8 kernels compute with.
    pub fn with_weights(mut self, quant: Quant) -> Self {
        if quant == Quant::Bf16 {
            return self;
        }
        let (h, c) = (self.config.hidden, &self.config);
        let (qw, kvw, inter) = (c.q_width(), c.kv_width(), c.intermediate);
        for l in &mut self.layers {
            for (w, rows, cols) in [
                (&mut l.q_proj, qw, h),
                (&mut l.k_proj, kvw, h),
                (&mut l.v_proj, kvw, h),
                (&mut l.o_proj, h, qw),
                (&mut l.gate_proj, inter, h),
                (&mut l.up_proj, inter, h),
                (&mut l.down_proj, h, inter),
            ] {
                *w = int8_round_trip(w, rows, cols);
            }
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        self.lm_head = Some(int8_round_trip(head, c.vocab, h));
        self
    }

    fn stored(&self, mut values: Vec<f32>) -> Vec<f32> {
        if self.bf16_activations {
            values
                .iter_mut()
                .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
        }
        values
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn new_cache(&self) -> CpuCache {
        CpuCache {
            keys: vec![Vec::new(); self.config.layers],
            values: vec![Vec::new(); self.config.layers],
            len: 0,
        }
    }

    /// Runs `token` at position `cache.len()`, appends its K/V, returns the logits `[vocab]`.
    pub fn forward(&self, token: u32, cache: &mut CpuCache) -> Result<Vec<f32>> {
        let c = &self.config;
        ensure!(
            (token as usize) < c.vocab,
            "token id {token} is outside the vocabulary ({})",
            c.vocab
        );
        ensure!(
            cache.len < c.max_positions,
            "position {} is past max_position_embeddings",
            cache.len
        );
        let position = cache.len;
        let row = token as usize * c.hidden;
        let mut x = self.embed[row..row + c.hidden].to_vec(); // [hidden] residual stream
        for (i, layer) in self.layers.iter().enumerate() {
            let h = self.stored(rms_norm(&x, &layer.input_norm, c.rms_eps));
            let mut q = matvec(&layer.q_proj, &h); // [q_heads * head_dim]
            let mut k = matvec(&layer.k_proj, &h); // [kv_heads * head_dim]
            let v = self.stored(matvec(&layer.v_proj, &h));
            for head in q.chunks_mut(c.head_dim) {
                head.copy_from_slice(&rms_norm(head, &layer.q_norm, c.rms_eps));
                rope(head, position, c.rope_theta);
            }
            for head in k.chunks_mut(c.head_dim) {
                head.copy_from_slice(&rms_norm(head, &layer.k_norm, c.rms_eps));
                rope(head, position, c.rope_theta);
            }
            let (q, k) = (self.stored(q), self.stored(k));
            cache.keys[i].extend_from_slice(&k);
            cache.values[i].extend_from_slice(&v);
            let attn = self.stored(attention(c, &q, &cache.keys[i], &cache.values[i]));
            add_assign(&mut x, &matvec(&layer.o_proj, &attn));
            let h = self.stored(rms_norm(&x, &layer.post_norm, c.rms_eps));
            let gate = matvec(&layer.gate_proj, &h);
            let up = matvec(&layer.up_proj, &h);
            let act = self.stored(gate.iter().zip(&up).map(|(&g, &u)| silu(g) * u).collect());
            add_assign(&mut x, &matvec(&layer.down_proj, &act));
        }
        cache.len += 1;
        let h = self.stored(rms_norm(&x, &self.final_norm, c.rms_eps));
        Ok(matvec(self.lm_head.as_ref().unwrap_or(&self.embed), &h))
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn add_assign(x: &mut [f32], delta: &[f32]) {
    x.iter_mut().zip(delta).for_each(|(a, b)| *a += b);
}

/// x / sqrt(mean(x^2) + eps) * weight.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    x.iter().zip(weight).map(|(v, w)| v * inv * w).collect()
}

/// Rotate-half RoPE over a whole head, angles in f32 as transformers computes them.
pub fn rope(head: &mut [f32], position: usize, theta: f64) {
    let half = head.len() / 2;
    for i in 0..half {
        let inv_freq = (1.0 / theta.powf(2.0 * i as f64 / head.len() as f64)) as f32;
        let angle = position as f32 * inv_freq;
        let (sin, cos) = (angle as f64).sin_cos();
        let (sin, cos) = (sin as f32, cos as f32);
        let (a, b) = (head[i], head[i + half]);
        head[i] = a * cos - b * sin;
        head[i + half] = b * cos + a * sin;
    }
}

/// Attention of one query over all cached positions [positions, kv_heads * head_dim]; GQA maps query head h to kv head
/// h / (q_heads / kv_heads). Returns [q_heads * head_dim].
pub fn attention(c: &ModelConfig, q: &[f32], keys: &[f32], values: &[f32]) -> Vec<f32> {
    let (d, kvw) = (c.head_dim, c.kv_width());
    let positions = keys.len() / kvw;
    let group = c.q_heads / c.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0.0; c.q_width()];
    for h in 0..c.q_heads {
        let kv = (h / group) * d;
        let qh = &q[h * d..(h + 1) * d];
        let scores: Vec<f32> = (0..positions)
            .map(|t| dot(qh, &keys[t * kvw + kv..t * kvw + kv + d]) * scale)
            .collect();
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f32 = weights.iter().sum();
        let oh = &mut out[h * d..(h + 1) * d];
        for (t, w) in weights.iter().enumerate() {
            let vt = &values[t * kvw + kv..t * kvw + kv + d];
            oh.iter_mut().zip(vt).for_each(|(o, v)| *o += w / total * v);
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: lets the compiler vectorize, and is closer to a tree sum than a chain.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += ca[j] * cb[j];
        }
    }
    let tail: f32 = a[chunks..]
        .iter()
        .zip(&b[chunks..])
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// w [rows, x.len()] times x; large products split their rows across the CPU's threads.
pub fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    let rows = w.len() / x.len();
    let mut out = vec![0.0; rows];
    let fill = |first_row: usize, chunk: &mut [f32]| {
        for (j, o) in chunk.iter_mut().enumerate() {
            let r = first_row + j;
            *o = dot(&w[r * x.len()..(r + 1) * x.len()], x);
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if w.len() < 1 << 22 || threads == 1 {
        fill(0, &mut out);
        return out;
    }
    let per_thread = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (index, chunk) in out.chunks_mut(per_thread).enumerate() {
            scope.spawn(move || fill(index * per_thread, chunk));
        }
    });
    out
}
