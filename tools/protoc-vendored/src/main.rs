//! Prints the path of the vendored `protoc` binary for this platform (used by `tools/protoc`).

fn main() {
    match protoc_bin_vendored::protoc_bin_path() {
        Ok(path) => println!("{}", path.display()),
        Err(e) => {
            eprintln!("no vendored protoc for this platform: {e}");
            std::process::exit(1);
        }
    }
}
