//! The CPU reference forward pass against transformers' logits on a tiny Qwen3 (fixture made by
//! scripts/make_reference_fixture.py: transformers, weights upcast to f32, eager attention).

mod common;

use braidinfer::compare::rel_l2;
use braidinfer::config::ModelConfig;
use braidinfer::reference::CpuModel;
use braidinfer::weights::ModelWeights;

#[test]
fn logits_match_transformers_on_a_tiny_qwen3() {
    let dir = common::fixture("tiny-qwen3");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = ModelWeights::load(&dir, &config).unwrap();
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("tiny_qwen3_logits.json")).unwrap(),
    )
    .unwrap();
    let tokens: Vec<u32> = serde_json::from_value(expected["tokens"].clone()).unwrap();
    let logits: Vec<Vec<f32>> = serde_json::from_value(expected["logits"].clone()).unwrap();
    assert_eq!(tokens.len(), logits.len());

    let model = CpuModel::new(&config, &weights);
    let mut cache = model.new_cache();
    for (position, (&token, reference)) in tokens.iter().zip(&logits).enumerate() {
        let ours = model.forward(token, &mut cache).unwrap();
        common::assert_all_finite(&ours, "logits");
        let error = rel_l2(&ours, reference);
        // Both sides compute in f32; only summation order differs.
        assert!(
            error < 1e-4,
            "position {position}: relative L2 error {error:.2e}"
        );
    }
}
