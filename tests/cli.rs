//! The braidinfer binary end to end on the CPU reference: bad input gives one clear line on
//! stderr and a non-zero exit, never a panic; a small model generates and streams text.

mod common;

use std::path::Path;
use std::process::Command;

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn braidinfer(args: &[&str]) -> Outcome {
    let output = Command::new(env!("CARGO_BIN_EXE_braidinfer"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", common::temp_dir("hf-home"))
        .output()
        .expect("running braidinfer");
    Outcome {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Asserts a clean failure whose one-line message contains `needle`.
fn assert_fails_with(args: &[&str], needle: &str) {
    let out = braidinfer(args);
    assert_ne!(out.code, 0, "{args:?} should fail; stdout {}", out.stdout);
    assert!(
        !out.stderr.contains("panicked"),
        "{args:?} panicked: {}",
        out.stderr
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one error line, got {}",
        out.stderr
    );
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{args:?}: {}",
        lines[0]
    );
}

fn dir_arg(dir: &Path) -> String {
    dir.display().to_string()
}

#[test]
fn missing_model_directory() {
    assert_fails_with(
        &["--model", "/definitely/not/here", "--prompt", "hi"],
        "does not exist",
    );
}

#[test]
fn uncached_repo_while_offline_says_how_to_get_it() {
    assert_fails_with(
        &["--model", "Qwen/Qwen3-0.6B", "--prompt", "hi"],
        "huggingface-cli download",
    );
}

#[test]
fn bad_sampling_and_length_arguments() {
    let synthetic = ["--synthetic", "--layers", "1", "--prompt", "hi"];
    let with = |extra: &[&'static str]| [&synthetic[..], extra].concat();
    assert_fails_with(&with(&["--temperature=-0.5"]), "--temperature must be >= 0");
    assert_fails_with(&with(&["--top-p", "0"]), "--top-p must be in (0, 1]");
    assert_fails_with(&with(&["--top-p", "1.5"]), "--top-p must be in (0, 1]");
    assert_fails_with(&with(&["--top-k", "0"]), "--top-k must be between 1 and 64");
    assert_fails_with(
        &with(&["--max-tokens", "0"]),
        "--max-tokens must be at least 1",
    );
    assert_fails_with(&["--synthetic", "--prompt", "  "], "the prompt is empty");
}

#[test]
fn corrupt_model_files() {
    let config = common::small_config();
    let dir = common::small_model_dir("cli-corrupt", &config);
    let model = dir_arg(&dir);
    let args = [
        "--model",
        model.as_str(),
        "--prompt",
        "hi",
        "--backend",
        "cpu",
    ];

    let config_text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        &config_text[..config_text.len() / 2],
    )
    .unwrap();
    assert_fails_with(&args, "malformed config.json");
    std::fs::write(dir.join("config.json"), &config_text).unwrap();

    let tokenizer = std::fs::read(dir.join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("tokenizer.json"), &tokenizer[..1000]).unwrap();
    assert_fails_with(&args, "malformed tokenizer file");
    std::fs::write(dir.join("tokenizer.json"), &tokenizer).unwrap();

    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("model.safetensors"),
        &weights[..weights.len() - 10],
    )
    .unwrap();
    assert_fails_with(&args, "truncated or corrupt");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_fails_with(&args, "no model.safetensors");
}

#[test]
fn wrong_shape_in_checkpoint() {
    let config = common::small_config();
    let dir = common::small_model_dir("cli-shape", &config);
    // Declare a wider model than the checkpoint holds: every tensor's shape disagrees.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    json["intermediate_size"] = 128.into();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let model = dir_arg(&dir);
    assert_fails_with(
        &["--model", &model, "--prompt", "hi"],
        "model.layers.0.mlp.gate_proj.weight: shape [96, 64], expected [128, 64]",
    );
}

#[test]
fn prompt_longer_than_the_context() {
    let config = braidinfer::config::ModelConfig {
        max_positions: 24,
        ..common::small_config()
    };
    let dir = common::small_model_dir("cli-context", &config);
    let model = dir_arg(&dir);
    let long_prompt = "word ".repeat(40);
    assert_fails_with(
        &[
            "--model",
            &model,
            "--prompt",
            &long_prompt,
            "--backend",
            "cpu",
        ],
        "context limit of 24 tokens",
    );
}

#[test]
fn small_model_generates_and_a_seed_reproduces_the_text() {
    let config = common::small_config();
    let dir = common::small_model_dir("cli-generate", &config);
    let model = dir_arg(&dir);
    let run = |seed: &str| {
        braidinfer(&[
            "--model",
            &model,
            "--prompt",
            "Tell me a story",
            "--max-tokens",
            "12",
            "--temperature",
            "1.0",
            "--top-k",
            "40",
            "--seed",
            seed,
            "--stats",
            "--backend",
            "cpu",
        ])
    };
    let first = run("5");
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(!first.stdout.trim().is_empty(), "no text streamed");
    assert!(
        first.stderr.contains("tokens generated at"),
        "--stats line missing: {}",
        first.stderr
    );
    assert_eq!(run("5").stdout, first.stdout, "same seed, same text");
}

#[test]
fn save_synthetic_writes_a_loadable_directory() {
    let dir = common::temp_dir("cli-save");
    let target = dir.join("model");
    let target_arg = dir_arg(&target);
    let out = braidinfer(&[
        "--synthetic",
        "--layers",
        "1",
        "--save-synthetic",
        &target_arg,
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(target.join(file).is_file(), "{file} missing");
    }
    let config = braidinfer::config::ModelConfig::from_file(&target.join("config.json")).unwrap();
    assert_eq!(config.layers, 1);
    braidinfer::weights::ModelWeights::load(&target, &config).unwrap();
}

#[test]
fn a_prompts_file_answers_every_line_together() {
    let config = common::small_config();
    let dir = common::small_model_dir("cli-prompts", &config);
    let model = dir_arg(&dir);
    let file = common::temp_dir("cli-prompts-file").join("prompts.txt");
    std::fs::write(&file, "Tell me a story\n\nWhy is the sky blue?\nHi\n").unwrap();
    let prompts = dir_arg(&file);
    let out = braidinfer(&[
        "--model",
        &model,
        "--prompts",
        &prompts,
        "--batch",
        "2",
        "--max-tokens",
        "6",
        "--stats",
        "--backend",
        "cpu",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for i in 1..=3 {
        assert_eq!(
            out.stdout
                .matches(&format!("### answer {i} of 3\n"))
                .count(),
            1,
            "answer {i} printed once: {}",
            out.stdout
        );
    }
    assert!(
        out.stderr.contains("3 prompts (") && out.stderr.contains("up to 2 decoded together"),
        "--stats line: {}",
        out.stderr
    );

    // The same prompts from standard input.
    let piped = Command::new(env!("CARGO_BIN_EXE_braidinfer"))
        .args([
            "--model",
            &model,
            "--prompts",
            "-",
            "--batch",
            "2",
            "--max-tokens",
            "6",
            "--backend",
            "cpu",
        ])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("running braidinfer");
    assert_eq!(
        String::from_utf8_lossy(&piped.stdout),
        out.stdout,
        "the same answers from standard input"
    );

    let empty = common::temp_dir("cli-prompts-empty").join("prompts.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let synthetic = ["--synthetic", "--layers", "1"];
    assert_fails_with(
        &[&synthetic[..], &["--prompts", &dir_arg(&empty)]].concat(),
        "has no prompt (one per line)",
    );
    assert_fails_with(
        &[&synthetic[..], &["--prompts", "/definitely/not/here.txt"]].concat(),
        "reading the prompts file /definitely/not/here.txt",
    );
    assert_fails_with(
        &[&synthetic[..], &["--prompts", &prompts, "--batch", "0"]].concat(),
        "--batch must be at least 1",
    );
    let both = braidinfer(&[&synthetic[..], &["--prompt", "hi", "--prompts", &prompts]].concat());
    assert_ne!(both.code, 0);
    assert!(
        both.stderr.contains("cannot be used with"),
        "{}",
        both.stderr
    );
}
