//! The prompt assets this worker serves to routers (`GetPromptAssets`): the tokenizer, chat
//! template and preprocessing files of its model directory, read once at start-up, so that
//! routers build prompts for exactly the model the worker runs without access to its weights.

use std::path::Path;

use dimple_proto::assets::PROMPT_ASSET_FILES;
use dimple_proto::worker as pb;

/// Reads the prompt asset files present in `dir` (a missing file is left out; the router
/// reports a missing `tokenizer.json`).
pub fn from_dir(model: &str, dir: &Path) -> std::io::Result<pb::PromptAssets> {
    let mut files = std::collections::HashMap::new();
    for name in PROMPT_ASSET_FILES {
        let path = dir.join(name);
        if path.is_file() {
            files.insert(name.to_owned(), std::fs::read(&path)?);
        }
    }
    Ok(pb::PromptAssets {
        model: model.to_owned(),
        files,
    })
}

/// The assets of the built-in demo model (its chat template is the router's default).
pub fn builtin() -> pb::PromptAssets {
    let files = [
        ("tokenizer.json", dimple_core::builtin::TOKENIZER_JSON),
        (
            "preprocessor_config.json",
            dimple_core::builtin::PREPROCESSOR_CONFIG_JSON,
        ),
    ];
    pb::PromptAssets {
        model: dimple_core::builtin::NAME.to_owned(),
        files: files
            .into_iter()
            .map(|(name, text)| (name.to_owned(), text.as_bytes().to_vec()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_listed_files_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("dimple-assets-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
        std::fs::write(dir.join("chat_template.jinja"), b"T").unwrap();
        std::fs::write(dir.join("model.safetensors"), b"weights").unwrap();
        let a = from_dir("m", &dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let mut names: Vec<_> = a.files.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["chat_template.jinja", "tokenizer.json"]);
        assert_eq!(a.files["chat_template.jinja"], b"T");
        assert_eq!(a.model, "m");
    }

    #[test]
    fn builtin_assets_carry_the_demo_tokenizer() {
        let a = builtin();
        assert_eq!(
            a.files["tokenizer.json"],
            dimple_core::builtin::TOKENIZER_JSON.as_bytes()
        );
        assert!(a.files.contains_key("preprocessor_config.json"));
    }
}
