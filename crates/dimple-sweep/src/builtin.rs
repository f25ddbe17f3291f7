//! The demo model's evaluation set compiled into the crate: the JSONL file and every image
//! it names (the build script lists `tests/fixtures/demo_eval/images/`).

pub const EVAL_JSONL: &str = include_str!("../../../tests/fixtures/demo_eval/eval.jsonl");

// `IMAGES: &[(&str, &[u8])]`: path as written in the JSONL (`images/0000.png`) and bytes.
include!(concat!(env!("OUT_DIR"), "/demo_eval_images.rs"));
