//! Where the model comes from: a checkpoint directory (`config.json`, safetensors shards,
//! `tokenizer.json`, optional `preprocessor_config.json`) or the built-in demo model.

use std::path::{Path, PathBuf};

use anyhow::Context;
use dimple_model::preprocess::PreprocessConfig;
use dimple_router::prompt::PromptBuilder;

/// A model directory, or `None` for the built-in demo model.
#[derive(Debug, Clone)]
pub struct ModelSource(pub Option<PathBuf>);

impl ModelSource {
    pub fn name(&self) -> String {
        match &self.0 {
            Some(d) => d.display().to_string(),
            None => dimple_core::builtin::NAME.to_string(),
        }
    }

    pub fn prompt_builder(&self) -> anyhow::Result<PromptBuilder> {
        match &self.0 {
            Some(dir) => PromptBuilder::from_dir(dir)
                .with_context(|| format!("loading the tokenizer from {}", dir.display())),
            None => Ok(PromptBuilder::builtin()?),
        }
    }

    /// The directory's `preprocessor_config.json`, or the defaults when it has none.
    pub fn preprocess_config(&self) -> anyhow::Result<PreprocessConfig> {
        match &self.0 {
            Some(dir) => {
                let path: &Path = &dir.join("preprocessor_config.json");
                if path.exists() {
                    Ok(PreprocessConfig::from_file(path)?)
                } else {
                    Ok(PreprocessConfig::default())
                }
            }
            None => Ok(PreprocessConfig::from_json(
                dimple_core::builtin::PREPROCESSOR_CONFIG_JSON,
            )?),
        }
    }
}
