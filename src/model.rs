//! A model ready to run: typed config, generation defaults, tokenizer and weights.

use std::path::Path;

use anyhow::{Context, Result};

use crate::config::{GenerationConfig, ModelConfig};
use crate::synthetic::synthetic_weights;
use crate::tokenizer::Tokenizer;
use crate::weights::ModelWeights;

pub struct Model {
    pub config: ModelConfig,
    pub generation: GenerationConfig,
    pub tokenizer: Tokenizer,
    pub weights: ModelWeights,
}

impl Model {
    /// Loads a Hugging Face style model directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let generation =
            GenerationConfig::from_file_or_default(&dir.join("generation_config.json"))?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let weights = ModelWeights::load(dir, &config)
            .with_context(|| format!("loading weights from {}", dir.display()))?;
        Ok(Self {
            config,
            generation,
            tokenizer,
            weights,
        })
    }

    /// Seeded synthetic weights for `config` with the real tokenizer from `tokenizer_dir`.
    pub fn synthetic(config: ModelConfig, seed: u64, tokenizer_dir: &Path) -> Result<Self> {
        let generation =
            GenerationConfig::from_file_or_default(&tokenizer_dir.join("generation_config.json"))?;
        let tokenizer = Tokenizer::from_dir(tokenizer_dir)?;
        let weights = synthetic_weights(&config, seed);
        Ok(Self {
            config,
            generation,
            tokenizer,
            weights,
        })
    }
}
