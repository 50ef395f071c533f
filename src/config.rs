//! `config.json` and `generation_config.json`, deserialized and validated into typed configs.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

/// Special token ids of the Qwen3 tokenizer.
pub const ENDOFTEXT_TOKEN: u32 = 151_643;
pub const IM_END_TOKEN: u32 = 151_645;

/// A validated Qwen3 model configuration. Layers, vocabulary and context are free; the
/// per-layer shapes are checked for consistency here and against the CUDA kernels in `gpu`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub rms_eps: f32,
    pub rope_theta: f64,
    pub tie_embeddings: bool,
}

impl ModelConfig {
    /// The published Qwen3-0.6B configuration.
    pub fn qwen3_0_6b() -> Self {
        Self {
            hidden: 1024,
            intermediate: 3072,
            layers: 28,
            q_heads: 16,
            kv_heads: 8,
            head_dim: 128,
            vocab: 151_936,
            max_positions: 40_960,
            rms_eps: 1e-6,
            rope_theta: 1_000_000.0,
            tie_embeddings: true,
        }
    }

    pub fn q_width(&self) -> usize {
        self.q_heads * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).context("malformed config.json")?;
        raw.validate()
    }

    /// config.json as transformers writes it for this model (both rope_theta spellings).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": ENDOFTEXT_TOKEN,
            "eos_token_id": IM_END_TOKEN,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": self.max_positions,
            "max_window_layers": self.layers,
            "num_attention_heads": self.q_heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": self.rms_eps,
            "rope_scaling": null,
            "rope_theta": self.rope_theta,
            "sliding_window": null,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": "bfloat16",
            "use_cache": true,
            "use_sliding_window": false,
            "vocab_size": self.vocab,
        })
    }
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    use_sliding_window: Option<bool>,
}

fn required(value: Option<usize>, field: &str) -> Result<usize> {
    match value {
        Some(0) => bail!("config.json: {field} must be positive, found 0"),
        Some(v) => Ok(v),
        None => bail!("config.json: missing field {field}"),
    }
}

impl RawConfig {
    fn validate(self) -> Result<ModelConfig> {
        let is_qwen3 = self.model_type.as_deref() == Some("qwen3")
            || self
                .architectures
                .iter()
                .flatten()
                .any(|a| a == "Qwen3ForCausalLM");
        ensure!(
            is_qwen3,
            "config.json: unsupported architecture (model_type {:?}, architectures {:?}); \
             braidinfer runs Qwen3 (model_type \"qwen3\")",
            self.model_type,
            self.architectures
        );
        if let Some(act) = &self.hidden_act {
            ensure!(
                act == "silu",
                "config.json: hidden_act must be \"silu\", found {act:?}"
            );
        }
        ensure!(
            self.attention_bias != Some(true),
            "config.json: attention_bias = true is not supported"
        );
        ensure!(
            self.use_sliding_window != Some(true),
            "config.json: use_sliding_window = true is not supported"
        );
        if let Some(scaling) = &self.rope_scaling {
            ensure!(
                scaling.is_null(),
                "config.json: rope_scaling {scaling} is not supported"
            );
        }
        let nested = self.rope_parameters.as_ref();
        if let Some(kind) = nested.and_then(|p| p.rope_type.as_deref()) {
            ensure!(
                kind == "default",
                "config.json: rope_parameters.rope_type {kind:?} is not supported"
            );
        }
        let rope_theta = self
            .rope_theta
            .or_else(|| nested.and_then(|p| p.rope_theta))
            .context("config.json: missing rope_theta (top level or in rope_parameters)")?;
        ensure!(rope_theta > 0.0, "config.json: rope_theta must be positive");

        let hidden = required(self.hidden_size, "hidden_size")?;
        let q_heads = required(self.num_attention_heads, "num_attention_heads")?;
        let kv_heads = required(self.num_key_value_heads, "num_key_value_heads")?;
        let head_dim = match self.head_dim {
            Some(d) => required(Some(d), "head_dim")?,
            None => hidden / q_heads,
        };
        ensure!(
            q_heads % kv_heads == 0,
            "config.json: num_attention_heads ({q_heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        );
        ensure!(
            head_dim % 2 == 0,
            "config.json: head_dim must be even for rotary embeddings, found {head_dim}"
        );
        let rms_eps = self
            .rms_norm_eps
            .context("config.json: missing field rms_norm_eps")?;
        ensure!(rms_eps > 0.0, "config.json: rms_norm_eps must be positive");
        Ok(ModelConfig {
            hidden,
            intermediate: required(self.intermediate_size, "intermediate_size")?,
            layers: required(self.num_hidden_layers, "num_hidden_layers")?,
            q_heads,
            kv_heads,
            head_dim,
            vocab: required(self.vocab_size, "vocab_size")?,
            max_positions: required(self.max_position_embeddings, "max_position_embeddings")?,
            rms_eps: rms_eps as f32,
            rope_theta,
            tie_embeddings: self.tie_word_embeddings.unwrap_or(true),
        })
    }
}

/// Sampling defaults and stop tokens from `generation_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub eos_tokens: Vec<u32>,
}

impl Default for GenerationConfig {
    /// Qwen3's published defaults.
    fn default() -> Self {
        Self {
            temperature: 0.6,
            top_k: 20,
            top_p: 0.95,
            eos_tokens: vec![IM_END_TOKEN, ENDOFTEXT_TOKEN],
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct RawGenerationConfig {
    do_sample: Option<bool>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    eos_token_id: Option<OneOrMany>,
}

impl GenerationConfig {
    /// Reads the file if it exists; a missing file gives Qwen3's defaults.
    pub fn from_file_or_default(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawGenerationConfig =
            serde_json::from_str(text).context("malformed generation_config.json")?;
        let default = Self::default();
        let greedy = raw.do_sample == Some(false);
        let eos_tokens = match raw.eos_token_id {
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) if !ids.is_empty() => ids,
            _ => default.eos_tokens,
        };
        Ok(Self {
            temperature: if greedy {
                0.0
            } else {
                raw.temperature.unwrap_or(default.temperature)
            },
            top_k: raw.top_k.unwrap_or(default.top_k),
            top_p: raw.top_p.unwrap_or(default.top_p),
            eos_tokens,
        })
    }
}
