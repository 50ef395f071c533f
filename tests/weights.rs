//! safetensors loading: round trip, tied embeddings, and every corrupt case giving a clear error.

mod common;

use std::borrow::Cow;
use std::path::Path;

use braidinfer::config::ModelConfig;
use braidinfer::synthetic::synthetic_weights;
use braidinfer::weights::{HostTensor, ModelWeights};
use safetensors::{Dtype, View};

/// A raw tensor of any dtype, for writing checkpoints the loader must reject.
struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Rewrites dir/model.safetensors with `edit` applied to its tensors.
fn rewrite(dir: &Path, config: &ModelConfig, edit: impl FnOnce(&mut Vec<(String, RawTensor)>)) {
    let weights = ModelWeights::load(dir, config).unwrap();
    let mut tensors: Vec<(String, RawTensor)> = weights
        .named_tensors()
        .into_iter()
        .map(|(name, t)| {
            let bytes = t
                .data
                .iter()
                .flat_map(|v| v.to_bits().to_le_bytes())
                .collect();
            (
                name,
                RawTensor {
                    dtype: Dtype::BF16,
                    shape: t.shape.clone(),
                    bytes,
                },
            )
        })
        .collect();
    edit(&mut tensors);
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.clone(), t)), None, &path)
        .unwrap();
}

fn load_error(dir: &Path, config: &ModelConfig) -> String {
    format!(
        "{:#}",
        ModelWeights::load(dir, config).expect_err("loading should fail")
    )
}

#[test]
fn saved_weights_load_back_identically() {
    let config = common::small_config();
    let dir = common::small_model_dir("roundtrip", &config);
    let loaded = ModelWeights::load(&dir, &config).unwrap();
    let original = synthetic_weights(&config, 7);
    assert_eq!(loaded.named_tensors(), original.named_tensors());
    assert!(
        loaded.lm_head.is_none(),
        "tied embeddings: no lm_head.weight written"
    );
}

#[test]
fn an_explicit_lm_head_is_used() {
    let config = common::small_config();
    let dir = common::small_model_dir("lm-head", &config);
    rewrite(&dir, &config, |tensors| {
        let n = config.vocab * config.hidden;
        let bytes = (0..n)
            .flat_map(|i| half::bf16::from_f32((i % 7) as f32).to_bits().to_le_bytes())
            .collect();
        tensors.push((
            "lm_head.weight".into(),
            RawTensor {
                dtype: Dtype::BF16,
                shape: vec![config.vocab, config.hidden],
                bytes,
            },
        ));
    });
    let loaded = ModelWeights::load(&dir, &config).unwrap();
    let head: &HostTensor = loaded.lm_head();
    assert_eq!(head.data[8].to_f32(), 1.0);
    assert_ne!(head.data, loaded.embed.data);
}

#[test]
fn missing_checkpoint_is_a_clear_error() {
    let config = common::small_config();
    let dir = common::temp_dir("no-checkpoint");
    assert!(load_error(&dir, &config).contains("no model.safetensors"));
}

#[test]
fn truncated_checkpoint_is_a_clear_error() {
    let config = common::small_config();
    let dir = common::small_model_dir("truncated", &config);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for keep in [4, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let err = load_error(&dir, &config);
        assert!(
            err.contains("truncated or corrupt"),
            "kept {keep} bytes: {err}"
        );
    }
}

#[test]
fn wrong_shape_names_the_tensor() {
    let config = common::small_config();
    let dir = common::small_model_dir("wrong-shape", &config);
    rewrite(&dir, &config, |tensors| {
        let t = &mut tensors
            .iter_mut()
            .find(|(n, _)| n == "model.layers.1.mlp.up_proj.weight")
            .unwrap()
            .1;
        t.shape = vec![config.intermediate / 2, config.hidden * 2];
    });
    let err = load_error(&dir, &config);
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("expected [96, 64]"),
        "{err}"
    );
}

#[test]
fn wrong_dtype_names_the_tensor() {
    let config = common::small_config();
    let dir = common::small_model_dir("wrong-dtype", &config);
    rewrite(&dir, &config, |tensors| {
        let t = &mut tensors
            .iter_mut()
            .find(|(n, _)| n == "model.layers.0.self_attn.k_norm.weight")
            .unwrap()
            .1;
        t.dtype = Dtype::F16;
    });
    let err = load_error(&dir, &config);
    assert!(
        err.contains("model.layers.0.self_attn.k_norm.weight") && err.contains("F16"),
        "{err}"
    );
}

#[test]
fn missing_tensor_names_it() {
    let config = common::small_config();
    let dir = common::small_model_dir("missing-tensor", &config);
    rewrite(&dir, &config, |tensors| {
        tensors.retain(|(n, _)| n != "model.norm.weight")
    });
    assert!(load_error(&dir, &config).contains("no tensor model.norm.weight"));
}

#[test]
fn synthetic_weights_are_seeded_and_exercise_the_numerics() {
    let config = common::small_config();
    let a = synthetic_weights(&config, 3);
    assert_eq!(
        a.named_tensors(),
        synthetic_weights(&config, 3).named_tensors()
    );
    assert_ne!(a.embed.data, synthetic_weights(&config, 4).embed.data);
    let k_norm_max = |layer: usize| {
        a.layers[layer]
            .k_norm
            .to_f32()
            .into_iter()
            .fold(0.0f32, f32::max)
    };
    assert!(
        k_norm_max(0) > 50.0,
        "layer 0 k_norm outliers near 100, got {}",
        k_norm_max(0)
    );
    assert!(k_norm_max(1) > 10.0);
    for layer in &a.layers {
        for norm in [
            &layer.input_norm,
            &layer.q_norm,
            &layer.k_norm,
            &layer.post_norm,
        ] {
            assert!(
                norm.to_f32().iter().any(|&v| (v - 1.0).abs() > 0.1),
                "norm weights must not be all ones"
            );
        }
    }
}
