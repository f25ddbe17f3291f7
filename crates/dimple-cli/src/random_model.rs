//! `dimple bench-random --save-model DIR`: the pseudo-random model of a shape written as a
//! model directory that `dimple serve --model DIR` (or a worker) loads like any checkpoint,
//! so a whole deployment can be measured over its real transports on a shape whose weights
//! are not at hand.
//!
//! The directory holds `config.json` (the shape), `model.safetensors` (the weights
//! `Checkpoint::Random` computes), the built-in model's generation and image-processing
//! settings with this shape's special ids, and a `tokenizer.json` covering the whole
//! vocabulary: the built-in tokenizer's byte-level vocabulary, its special tokens moved to
//! the ids the configuration names, and a placeholder token `<tN>` for every other id, so
//! every id the model can produce decodes to text.

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::DType;
use dimple_core::builtin;
use dimple_model::DimpleConfig;
use dimple_router::prompt::SpecialToken;
use serde_json::{Value, json};

/// Writes the model directory (created if absent; the listed files are replaced).
pub fn write(cfg: &DimpleConfig, dtype: DType, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let put = |name: &str, value: &Value| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(value)?)
            .with_context(|| format!("writing {}", path.display()))
    };
    put("config.json", &serde_json::to_value(cfg)?)?;
    put("tokenizer.json", &tokenizer(cfg)?)?;
    let mut generation: Value = serde_json::from_str(builtin::GENERATION_CONFIG_JSON)?;
    generation["eos_token_id"] = json!(cfg.eos_token_id);
    generation["mask_token_id"] = json!(cfg.mask_token_id);
    generation["pad_token_id"] = json!(cfg.pad_token_id);
    put("generation_config.json", &generation)?;
    put(
        "preprocessor_config.json",
        &serde_json::from_str(builtin::PREPROCESSOR_CONFIG_JSON)?,
    )?;
    dimple_model::save_random_weights(cfg, dtype, &dir.join("model.safetensors"))?;
    Ok(())
}

/// The built-in tokenizer stretched over `cfg`'s vocabulary (see the module docs).
fn tokenizer(cfg: &DimpleConfig) -> anyhow::Result<Value> {
    let mut t: Value = serde_json::from_str(builtin::TOKENIZER_JSON)?;
    let vocab = t["model"]["vocab"]
        .as_object_mut()
        .context("the built-in tokenizer has no model vocabulary")?;
    let base = vocab.len() as u32;
    let size = cfg.vocab_size as u32;

    // Special tokens the configuration places, then the chat markers it does not name at
    // the highest ids left free.
    let mut specials: Vec<(&str, u32)> = vec![
        (SpecialToken::ImEnd.as_str(), cfg.eos_token_id),
        (SpecialToken::Mask.as_str(), cfg.mask_token_id),
        (SpecialToken::ImagePad.as_str(), cfg.image_token_id),
        ("<|video_pad|>", cfg.video_token_id),
        (
            SpecialToken::VisionStart.as_str(),
            cfg.vision_start_token_id,
        ),
        (SpecialToken::VisionEnd.as_str(), cfg.vision_end_token_id),
        ("<|vision_pad|>", cfg.vision_token_id),
    ];
    if cfg.pad_token_id != cfg.eos_token_id {
        specials.push((SpecialToken::EndOfText.as_str(), cfg.pad_token_id));
    }
    let mut free = (base..size).rev();
    for marker in [SpecialToken::EndOfText, SpecialToken::ImStart].map(SpecialToken::as_str) {
        if specials.iter().any(|(text, _)| *text == marker) {
            continue;
        }
        let id = free
            .by_ref()
            .find(|id| specials.iter().all(|(_, taken)| taken != id))
            .context("the vocabulary has no room left for the chat markers")?;
        specials.push((marker, id));
    }
    for (i, (text, id)) in specials.iter().enumerate() {
        if *id < base || *id >= size {
            bail!(
                "{text} has id {id}, outside {base}..{size}: the random model's special ids \
                 must lie above the built-in tokenizer's {base} byte-level tokens"
            );
        }
        if let Some((other, _)) = specials[..i].iter().find(|(_, o)| o == id) {
            bail!("{text} and {other} share id {id}");
        }
    }

    for id in base..size {
        if specials.iter().all(|(_, taken)| *taken != id) {
            let token = format!("<t{id}>");
            if vocab.insert(token.clone(), json!(id)).is_some() {
                bail!("the built-in vocabulary already has {token}");
            }
        }
    }
    let mut added: Vec<Value> = t["added_tokens"]
        .as_array()
        .context("the built-in tokenizer has no added tokens")?
        .clone();
    for token in &mut added {
        let text = token["content"].as_str().unwrap_or_default().to_owned();
        let id = specials
            .iter()
            .find(|(t, _)| *t == text)
            .map(|(_, id)| *id)
            .with_context(|| format!("no id chosen for the built-in special token {text}"))?;
        token["id"] = json!(id);
    }
    added.sort_by_key(|t| t["id"].as_u64());
    t["added_tokens"] = Value::Array(added);
    Ok(t)
}
