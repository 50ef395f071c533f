//! Model weights: read from safetensors (mapped from disk), every tensor checked for presence,
//! dtype and shape at one choke point, and written back (for synthetic model directories).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use half::bf16;
use safetensors::{Dtype, SafeTensors, View};

use crate::config::ModelConfig;

/// A bf16 tensor in host memory, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<bf16>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<bf16>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?} vs data length"
        );
        Self { shape, data }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|v| v.to_f32()).collect()
    }

    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(
            self.data
                .iter()
                .flat_map(|v| v.to_bits().to_le_bytes())
                .collect(),
        )
    }
    fn data_len(&self) -> usize {
        self.bytes()
    }
}

/// The weights of one decoder layer; shapes are `[out_features, in_features]`.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub input_norm: HostTensor, // [hidden]
    pub q_proj: HostTensor,     // [q_heads * head_dim, hidden]
    pub k_proj: HostTensor,     // [kv_heads * head_dim, hidden]
    pub v_proj: HostTensor,     // [kv_heads * head_dim, hidden]
    pub o_proj: HostTensor,     // [hidden, q_heads * head_dim]
    pub q_norm: HostTensor,     // [head_dim]
    pub k_norm: HostTensor,     // [head_dim]
    pub post_norm: HostTensor,  // [hidden]
    pub gate_proj: HostTensor,  // [intermediate, hidden]
    pub up_proj: HostTensor,    // [intermediate, hidden]
    pub down_proj: HostTensor,  // [hidden, intermediate]
}

#[derive(Clone, Debug)]
pub struct ModelWeights {
    pub embed: HostTensor, // [vocab, hidden]
    pub layers: Vec<LayerWeights>,
    pub final_norm: HostTensor,      // [hidden]
    pub lm_head: Option<HostTensor>, // [vocab, hidden]; None: tied to `embed`
}

impl ModelWeights {
    pub fn lm_head(&self) -> &HostTensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Every tensor under its checkpoint name (the tied LM head is not repeated).
    pub fn named_tensors(&self) -> Vec<(String, &HostTensor)> {
        let mut named = vec![("model.embed_tokens.weight".to_string(), &self.embed)];
        for (i, layer) in self.layers.iter().enumerate() {
            for (suffix, tensor) in layer.named() {
                named.push((format!("model.layers.{i}.{suffix}"), tensor));
            }
        }
        named.push(("model.norm.weight".to_string(), &self.final_norm));
        if let Some(head) = &self.lm_head {
            named.push(("lm_head.weight".to_string(), head));
        }
        named
    }

    /// Loads `model.safetensors` (or the shards of `model.safetensors.index.json`) from `dir`.
    pub fn load(dir: &Path, config: &ModelConfig) -> Result<Self> {
        let files = CheckpointFiles::open(dir)?;
        let take = |name: &str, shape: &[usize]| files.tensor(name, shape);
        let (h, qw, kvw, hd, inter) = (
            config.hidden,
            config.q_width(),
            config.kv_width(),
            config.head_dim,
            config.intermediate,
        );
        let layers = (0..config.layers)
            .map(|i| {
                let p = |suffix: &str| format!("model.layers.{i}.{suffix}");
                Ok(LayerWeights {
                    input_norm: take(&p("input_layernorm.weight"), &[h])?,
                    q_proj: take(&p("self_attn.q_proj.weight"), &[qw, h])?,
                    k_proj: take(&p("self_attn.k_proj.weight"), &[kvw, h])?,
                    v_proj: take(&p("self_attn.v_proj.weight"), &[kvw, h])?,
                    o_proj: take(&p("self_attn.o_proj.weight"), &[h, qw])?,
                    q_norm: take(&p("self_attn.q_norm.weight"), &[hd])?,
                    k_norm: take(&p("self_attn.k_norm.weight"), &[hd])?,
                    post_norm: take(&p("post_attention_layernorm.weight"), &[h])?,
                    gate_proj: take(&p("mlp.gate_proj.weight"), &[inter, h])?,
                    up_proj: take(&p("mlp.up_proj.weight"), &[inter, h])?,
                    down_proj: take(&p("mlp.down_proj.weight"), &[h, inter])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = take("model.embed_tokens.weight", &[config.vocab, h])?;
        let lm_head = if files.contains("lm_head.weight") {
            Some(take("lm_head.weight", &[config.vocab, h])?)
        } else {
            ensure!(
                config.tie_embeddings,
                "checkpoint has no lm_head.weight and config.json sets tie_word_embeddings = false"
            );
            None
        };
        Ok(Self {
            embed,
            layers,
            final_norm: take("model.norm.weight", &[h])?,
            lm_head,
        })
    }

    /// Writes one `model.safetensors` that transformers and [`ModelWeights::load`] read.
    pub fn save(&self, path: &Path) -> Result<()> {
        let metadata = [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect();
        safetensors::serialize_to_file(self.named_tensors(), Some(metadata), path)
            .with_context(|| format!("writing {}", path.display()))
    }
}

impl LayerWeights {
    /// Every tensor of the layer under its name within the layer.
    pub fn named(&self) -> [(&'static str, &HostTensor); 11] {
        [
            ("input_layernorm.weight", &self.input_norm),
            ("self_attn.q_proj.weight", &self.q_proj),
            ("self_attn.k_proj.weight", &self.k_proj),
            ("self_attn.v_proj.weight", &self.v_proj),
            ("self_attn.o_proj.weight", &self.o_proj),
            ("self_attn.q_norm.weight", &self.q_norm),
            ("self_attn.k_norm.weight", &self.k_norm),
            ("post_attention_layernorm.weight", &self.post_norm),
            ("mlp.gate_proj.weight", &self.gate_proj),
            ("mlp.up_proj.weight", &self.up_proj),
            ("mlp.down_proj.weight", &self.down_proj),
        ]
    }
}

/// The mapped safetensors files of a checkpoint and which file holds each tensor.
struct CheckpointFiles {
    maps: Vec<(PathBuf, memmap2::Mmap)>,
    location: BTreeMap<String, usize>,
}

impl CheckpointFiles {
    fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_paths(&index)?
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            );
        };
        let mut maps = Vec::new();
        let mut location = BTreeMap::new();
        for path in paths {
            let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: the checkpoint is opened read-only and not modified while mapped; a file
            // changed underneath the process is outside what a loader can defend against.
            let map = unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("mapping {}", path.display()))?;
            let tensors = SafeTensors::deserialize(&map).map_err(|e| {
                anyhow::anyhow!(
                    "{}: truncated or corrupt safetensors file ({e})",
                    path.display()
                )
            })?;
            for name in tensors.names() {
                location.insert(name.to_string(), maps.len());
            }
            maps.push((path, map));
        }
        Ok(Self { maps, location })
    }

    fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    fn tensor(&self, name: &str, expected_shape: &[usize]) -> Result<HostTensor> {
        let context = || format!("loading {name}");
        let &file = self
            .location
            .get(name)
            .with_context(|| format!("checkpoint has no tensor {name}"))?;
        let (path, map) = &self.maps[file];
        let tensors = SafeTensors::deserialize(map)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
            .with_context(context)?;
        let view = tensors
            .tensor(name)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
            .with_context(context)?;
        ensure!(
            view.dtype() == Dtype::BF16,
            "loading {name}: dtype {:?}, expected BF16",
            view.dtype()
        );
        ensure!(
            view.shape() == expected_shape,
            "loading {name}: shape {:?}, expected {:?}",
            view.shape(),
            expected_shape
        );
        let data = view
            .data()
            .chunks_exact(2)
            .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
            .collect();
        Ok(HostTensor::new(expected_shape.to_vec(), data))
    }
}

fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let text =
        std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: no weight_map object", index.display()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = map
        .values()
        .filter_map(|v| v.as_str())
        .map(|file| dir.join(file))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}
