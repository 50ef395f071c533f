//! Where a model's files come from: a local directory, a Hugging Face repo id resolved through
//! the standard Hugging Face cache (downloading when allowed), and the tokenizer files that
//! `--synthetic` runs use.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Files a model directory must hold (generation_config.json is optional).
const REQUIRED_FILES: [&str; 4] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
];
const OPTIONAL_FILES: [&str; 1] = ["generation_config.json"];

/// `spec` is a local directory or a repo id such as `Qwen/Qwen3-0.6B`; returns the directory.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        if !path.is_dir() {
            bail!("--model {spec}: not a directory");
        }
        return Ok(path.to_path_buf());
    }
    let looks_like_path = spec.starts_with(['/', '.', '~']) || spec.matches('/').count() != 1;
    if looks_like_path {
        bail!("model directory {spec} does not exist");
    }
    resolve_repo(spec)
}

fn resolve_repo(repo_id: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(repo_id.to_string());
    if let Some(dir) = cached_snapshot(&cached) {
        return Ok(dir);
    }
    let how_to_get = format!(
        "get it with `huggingface-cli download {repo_id}` (cache: {}), or pass --model DIR, or run with --synthetic",
        cache.path().display()
    );
    if std::env::var_os("HF_HUB_OFFLINE").is_some_and(|v| v != "0") {
        bail!("model {repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {how_to_get}");
    }
    let api = match hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
    {
        Ok(api) => api.model(repo_id.to_string()),
        Err(e) => bail!(
            "model {repo_id} is not cached and the Hugging Face client failed ({e}): {how_to_get}"
        ),
    };
    let mut config_path = None;
    for file in REQUIRED_FILES {
        match api.get(file) {
            Ok(path) => config_path = config_path.or(Some(path)),
            Err(e) => {
                bail!("model {repo_id}: could not download {file} ({e}); offline? {how_to_get}")
            }
        }
    }
    for file in OPTIONAL_FILES {
        let _ = api.get(file); // absent on some repos; defaults apply
    }
    match config_path.as_deref().and_then(Path::parent) {
        Some(dir) => Ok(dir.to_path_buf()),
        None => bail!("model {repo_id}: the download left no snapshot directory"),
    }
}

/// The snapshot directory if every required file is already cached.
fn cached_snapshot(repo: &hf_hub::CacheRepo) -> Option<PathBuf> {
    let paths: Option<Vec<PathBuf>> = REQUIRED_FILES.iter().map(|f| repo.get(f)).collect();
    paths?.first()?.parent().map(Path::to_path_buf)
}

/// The tokenizer files for `--synthetic`: `explicit` (`--tokenizer`) if given, else
/// `$BRAIDINFER_TOKENIZER_DIR`, then `qwen3-0.6b/` beside the executable (the GPU bundle), then
/// the repository's `../shared/models/qwen3-0.6b`.
pub fn tokenizer_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir.to_path_buf());
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("BRAIDINFER_TOKENIZER_DIR") {
        candidates.push(PathBuf::from(dir));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(exe_dir.join("qwen3-0.6b"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/qwen3-0.6b"));
    match candidates
        .iter()
        .find(|dir| dir.join("tokenizer.json").is_file())
    {
        Some(dir) => Ok(dir.clone()),
        None => bail!(
            "no Qwen3 tokenizer found for --synthetic (looked in {}); pass --tokenizer DIR",
            candidates
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
