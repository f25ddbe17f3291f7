//! Evaluation items: a JSONL file (one item per line) or a synthetic generator, and the
//! scoring of an answer against the reference.
//!
//! A line holds `id`, the prompt as `messages` (chat turns, text only; images attach to the
//! last user turn) or `text`/`question`, optional `images` (paths) or `image` (one path),
//! the reference as `answer` or `reference`, and `answer_type` (`exact`, `contains`,
//! `choice`, `number`; default `exact`). Relative image paths resolve against the file.
//!
//! The demo model's evaluation set (100 items, their images included) is compiled into the
//! crate ([`demo_eval`]), so the default dataset needs no files next to the binary.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::{Result, SweepError, file_err};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerType {
    /// The answer equals the reference (trimmed, case-insensitive).
    #[default]
    Exact,
    /// The answer contains the reference (case-insensitive).
    Contains,
    /// A multiple-choice letter: the first standalone A-Z letter of the answer.
    Choice,
    /// The first number in the answer equals the reference number.
    Number,
}

/// One chat turn of an item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    pub turns: Vec<Turn>,
    /// Encoded image files (PNG, JPEG, ...), attached before the last user turn's text.
    #[serde(skip)]
    pub images: Vec<Vec<u8>>,
    pub reference: Option<String>,
    pub answer_type: AnswerType,
    /// Free-form category for per-kind accuracy (e.g. `color`, `count`).
    pub kind: Option<String>,
}

impl Item {
    /// Whether `answer` is right; `None` when the item has no reference.
    pub fn score(&self, answer: &str) -> Option<bool> {
        let reference = self.reference.as_deref()?;
        Some(score(self.answer_type, answer, reference))
    }
}

pub fn score(kind: AnswerType, answer: &str, reference: &str) -> bool {
    let a = answer.trim().to_lowercase();
    let r = reference.trim().to_lowercase();
    match kind {
        AnswerType::Exact => a == r,
        AnswerType::Contains => a.contains(&r),
        AnswerType::Choice => {
            let letter = |s: &str| {
                s.split(|c: char| !c.is_ascii_alphanumeric())
                    .find(|w| w.len() == 1 && w.chars().all(|c| c.is_ascii_alphabetic()))
                    .map(|w| w.to_ascii_uppercase())
            };
            letter(&a).is_some_and(|x| Some(x) == letter(&r))
        }
        AnswerType::Number => {
            let first_number = |s: &str| -> Option<f64> {
                let mut cur = String::new();
                for c in s.chars() {
                    if c.is_ascii_digit()
                        || (c == '.' && !cur.is_empty())
                        || (c == '-' && cur.is_empty())
                    {
                        cur.push(c);
                    } else if !cur.is_empty() && cur != "-" {
                        break;
                    } else {
                        cur.clear();
                    }
                }
                cur.trim_end_matches('.').parse().ok()
            };
            match (first_number(&a), first_number(&r)) {
                (Some(x), Some(y)) => (x - y).abs() < 1e-9,
                _ => false,
            }
        }
    }
}

#[derive(Deserialize)]
struct Line {
    id: Option<serde_json::Value>,
    messages: Option<Vec<Turn>>,
    text: Option<String>,
    question: Option<String>,
    images: Option<Vec<String>>,
    image: Option<String>,
    answer: Option<String>,
    reference: Option<String>,
    answer_type: Option<AnswerType>,
    kind: Option<String>,
}

/// Reads a JSONL dataset, loading its images.
pub fn load_jsonl(path: &Path) -> Result<Vec<Item>> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse_jsonl(&text, path, |rel| {
        let p: PathBuf = base.join(rel);
        std::fs::read(&p).map_err(|e| file_err(&p, e))
    })
}

/// Name under which the built-in evaluation set is reported.
pub const DEMO_EVAL_NAME: &str = "dimple-demo-eval (built in)";

/// The demo model's evaluation set, from the copy compiled into the crate.
pub fn demo_eval() -> Result<Vec<Item>> {
    parse_jsonl(
        crate::builtin::EVAL_JSONL,
        Path::new(DEMO_EVAL_NAME),
        |rel| {
            crate::builtin::IMAGES
                .iter()
                .find(|(name, _)| *name == rel)
                .map(|(_, bytes)| bytes.to_vec())
                .ok_or_else(|| SweepError::Dataset(format!("the built-in set has no image {rel}")))
        },
    )
}

/// Parses JSONL text; `image` returns the bytes of an image path as written in the file.
pub fn parse_jsonl(
    text: &str,
    path: &Path,
    mut image: impl FnMut(&str) -> Result<Vec<u8>>,
) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line)
            .map_err(|e| file_err(path, format!("line {}: {e}", n + 1)))?;
        let turns = match (l.messages, l.text.or(l.question)) {
            (Some(m), _) if !m.is_empty() => m,
            (_, Some(t)) => vec![Turn {
                role: "user".into(),
                content: t,
            }],
            _ => {
                return Err(file_err(
                    path,
                    format!("line {}: no `messages`, `text` or `question`", n + 1),
                ));
            }
        };
        let mut images = Vec::new();
        for rel in l.images.unwrap_or_default().into_iter().chain(l.image) {
            images.push(image(&rel)?);
        }
        let id = match l.id {
            Some(serde_json::Value::String(s)) => s,
            Some(v) => v.to_string(),
            None => format!("{}", n + 1),
        };
        items.push(Item {
            id,
            turns,
            images,
            reference: l.answer.or(l.reference),
            answer_type: l.answer_type.unwrap_or_default(),
            kind: l.kind,
        });
    }
    if items.is_empty() {
        return Err(SweepError::Dataset(format!(
            "{} holds no items",
            path.display()
        )));
    }
    Ok(items)
}

/// SHA-256 (hex) of everything in `items` that can change a result: ids, turns, images,
/// references, answer types and kinds, in order. Two runs agree on it exactly when they
/// send the same requests and score them the same way.
pub fn content_hash(items: &[Item]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for it in items {
        // The JSON form skips images; they go in after it, each prefixed by its length so
        // that boundaries cannot shift between items.
        let json = serde_json::to_vec(it).unwrap_or_default();
        h.update((json.len() as u64).to_le_bytes());
        h.update(&json);
        h.update((it.images.len() as u64).to_le_bytes());
        for im in &it.images {
            h.update((im.len() as u64).to_le_bytes());
            h.update(im);
        }
    }
    hex(&h.finalize())
}

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Shape of a synthetic workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyntheticSpec {
    pub items: usize,
    /// Prompt length in words, drawn uniformly from this inclusive range.
    pub prompt_words: (usize, usize),
    /// Share of items that carry one image.
    pub image_share: f64,
    /// Image sizes (width, height) drawn uniformly.
    pub image_sizes: Vec<(u32, u32)>,
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            items: 64,
            prompt_words: (4, 24),
            image_share: 0.5,
            image_sizes: vec![(112, 112), (224, 168)],
            seed: 0,
        }
    }
}

const WORDS: &[&str] = &[
    "what", "color", "is", "the", "square", "circle", "triangle", "how", "many", "shapes", "are",
    "there", "describe", "image", "which", "shape", "red", "blue", "green", "yellow", "left",
    "right", "top", "bottom", "repeat", "cat", "dog", "plus", "number", "where",
];

/// Items with random word prompts and random-noise PNG images, no references.
pub fn synthetic(spec: &SyntheticSpec) -> Result<Vec<Item>> {
    if spec.prompt_words.0 == 0 || spec.prompt_words.0 > spec.prompt_words.1 {
        return Err(SweepError::Dataset(format!(
            "prompt length range {:?} is empty",
            spec.prompt_words
        )));
    }
    if !(0.0..=1.0).contains(&spec.image_share) {
        return Err(SweepError::Dataset(format!(
            "image share {} is not in [0, 1]",
            spec.image_share
        )));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let mut items = Vec::with_capacity(spec.items);
    for i in 0..spec.items {
        let words = rng.random_range(spec.prompt_words.0..=spec.prompt_words.1);
        let text: Vec<&str> = (0..words)
            .map(|_| WORDS[rng.random_range(0..WORDS.len())])
            .collect();
        let mut images = Vec::new();
        if !spec.image_sizes.is_empty() && rng.random_bool(spec.image_share) {
            let (w, h) = spec.image_sizes[rng.random_range(0..spec.image_sizes.len())];
            let mut img = image::RgbImage::new(w, h);
            for p in img.pixels_mut() {
                *p = image::Rgb([rng.random(), rng.random(), rng.random()]);
            }
            let mut png = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| SweepError::Dataset(e.to_string()))?;
            images.push(png);
        }
        items.push(Item {
            id: format!("synthetic-{i}"),
            turns: vec![Turn {
                role: "user".into(),
                content: text.join(" "),
            }],
            images,
            reference: None,
            answer_type: AnswerType::Exact,
            kind: None,
        });
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoring_rules() {
        assert!(score(AnswerType::Exact, " Red ", "red"));
        assert!(!score(AnswerType::Exact, "red square", "red"));
        assert!(score(AnswerType::Contains, "a red square", "red"));
        assert!(score(AnswerType::Choice, "(B) because", "B"));
        assert!(!score(AnswerType::Choice, "A", "B"));
        assert!(score(AnswerType::Number, "it is 12.", "12"));
        assert!(score(AnswerType::Number, "-3 apples", "-3.0"));
        assert!(!score(AnswerType::Number, "13", "12"));
        assert!(!score(AnswerType::Number, "none", "12"));
    }

    #[test]
    fn built_in_set_has_every_image() {
        let items = demo_eval().unwrap();
        assert_eq!(items.len(), 100);
        let with_images = items.iter().filter(|i| !i.images.is_empty()).count();
        assert!(with_images > 0);
        // The images decode and are PNGs.
        for it in items.iter().filter(|i| !i.images.is_empty()) {
            assert_eq!(&it.images[0][..4], b"\x89PNG");
        }
    }

    #[test]
    fn content_hash_sees_every_change() {
        let items = demo_eval().unwrap();
        let base = content_hash(&items);
        assert_eq!(base.len(), 64);
        assert_eq!(base, content_hash(&items.clone()));
        assert_ne!(base, content_hash(&items[..99]), "fewer items");
        let mut changed = items.clone();
        changed[3].reference = Some("something else".into());
        assert_ne!(base, content_hash(&changed), "a reference");
        let mut changed = items.clone();
        let i = changed.iter().position(|i| !i.images.is_empty()).unwrap();
        let last = changed[i].images[0].len() - 1;
        changed[i].images[0][last] ^= 1;
        assert_ne!(base, content_hash(&changed), "one image byte");
    }

    #[test]
    fn synthetic_is_seeded_and_respects_shares() {
        let spec = SyntheticSpec {
            items: 50,
            image_share: 1.0,
            ..SyntheticSpec::default()
        };
        let a = synthetic(&spec).unwrap();
        let b = synthetic(&spec).unwrap();
        assert_eq!(a, b);
        assert!(a.iter().all(|i| i.images.len() == 1));
        let none = synthetic(&SyntheticSpec {
            image_share: 0.0,
            ..spec.clone()
        })
        .unwrap();
        assert!(none.iter().all(|i| i.images.is_empty()));
        assert!(
            synthetic(&SyntheticSpec {
                prompt_words: (5, 2),
                ..spec
            })
            .is_err()
        );
    }
}
