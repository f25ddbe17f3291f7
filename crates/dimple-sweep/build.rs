//! Lists the demo evaluation set's images so that `src/builtin.rs` can compile them in.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let dir = manifest.join("../../tests/fixtures/demo_eval/images");
    println!("cargo:rerun-if-changed={}", dir.display());
    println!(
        "cargo:rerun-if-changed={}",
        manifest
            .join("../../tests/fixtures/demo_eval/eval.jsonl")
            .display()
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests/fixtures/demo_eval/images exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png"))
        .collect();
    names.sort();
    let mut src = String::from("pub static IMAGES: &[(&str, &[u8])] = &[\n");
    for n in &names {
        let path = dir.join(n).canonicalize().expect("listed file exists");
        let _ = writeln!(
            src,
            "    (\"images/{n}\", include_bytes!({:?})),",
            path.display().to_string()
        );
    }
    src.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    std::fs::write(out.join("demo_eval_images.rs"), src).expect("OUT_DIR is writable");
}
