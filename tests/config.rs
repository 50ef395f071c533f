//! config.json and generation_config.json parsing, including the malformed cases.

use braidinfer::config::{GenerationConfig, ModelConfig};

fn shared_config() -> String {
    std::fs::read_to_string(common::tokenizer_dir().join("config.json")).unwrap()
}

mod common;

#[test]
fn published_config_parses_to_qwen3_0_6b() {
    assert_eq!(
        ModelConfig::from_json(&shared_config()).unwrap(),
        ModelConfig::qwen3_0_6b()
    );
}

#[test]
fn nested_rope_parameters_are_accepted() {
    let mut json: serde_json::Value = serde_json::from_str(&shared_config()).unwrap();
    let obj = json.as_object_mut().unwrap();
    obj.remove("rope_theta");
    obj.insert(
        "rope_parameters".into(),
        serde_json::json!({"rope_theta": 5e5, "rope_type": "default"}),
    );
    let config = ModelConfig::from_json(&json.to_string()).unwrap();
    assert_eq!(config.rope_theta, 5e5);
}

#[test]
fn written_config_round_trips() {
    let config = common::small_config();
    assert_eq!(
        ModelConfig::from_json(&config.to_json().to_string()).unwrap(),
        config
    );
}

fn error_of(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let mut json: serde_json::Value = serde_json::from_str(&shared_config()).unwrap();
    edit(json.as_object_mut().unwrap());
    format!(
        "{:#}",
        ModelConfig::from_json(&json.to_string()).unwrap_err()
    )
}

#[test]
fn malformed_json_is_a_clear_error() {
    let err = format!(
        "{:#}",
        ModelConfig::from_json("{\"hidden_size\": 1024,").unwrap_err()
    );
    assert!(err.contains("malformed config.json"), "{err}");
}

#[test]
fn unsupported_architecture_names_the_field() {
    let err = error_of(|c| {
        c.insert("model_type".into(), "llama".into());
        c.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
    });
    assert!(err.contains("unsupported architecture"), "{err}");
}

#[test]
fn missing_or_zero_dimensions_name_the_field() {
    let err = error_of(|c| {
        c.remove("hidden_size");
    });
    assert!(err.contains("hidden_size"), "{err}");
    let err = error_of(|c| {
        c.insert("num_hidden_layers".into(), 0.into());
    });
    assert!(err.contains("num_hidden_layers must be positive"), "{err}");
    let err = error_of(|c| {
        c.insert("num_key_value_heads".into(), 5.into());
    });
    assert!(err.contains("num_key_value_heads"), "{err}");
    let err = error_of(|c| {
        c.remove("rope_theta");
    });
    assert!(err.contains("rope_theta"), "{err}");
    let err = error_of(|c| {
        c.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
        );
    });
    assert!(err.contains("rope_scaling"), "{err}");
    let err = error_of(|c| {
        c.insert("hidden_size".into(), "wide".into());
    });
    assert!(err.contains("malformed config.json"), "{err}");
}

#[test]
fn generation_config_gives_sampling_defaults_and_stop_tokens() {
    let text =
        std::fs::read_to_string(common::tokenizer_dir().join("generation_config.json")).unwrap();
    let generation = GenerationConfig::from_json(&text).unwrap();
    assert_eq!(
        (generation.temperature, generation.top_k, generation.top_p),
        (0.6, 20, 0.95)
    );
    assert_eq!(generation.eos_tokens, vec![151_645, 151_643]);
    let greedy = GenerationConfig::from_json(r#"{"do_sample": false, "eos_token_id": 7}"#).unwrap();
    assert_eq!((greedy.temperature, greedy.eos_tokens), (0.0, vec![7]));
    assert!(GenerationConfig::from_json("[").is_err());
}
