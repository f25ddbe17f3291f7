//! Routers without the model's files: `dimple router --assets-from-workers` fetches the
//! tokenizer, chat template and preprocessing config from a worker over real sockets (waiting
//! for one to come up) and then tokenises exactly as a router given the model directory does.
//! And `--device cuda` is refused at start by a binary that cannot honour it.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dimple_proto::v1;
use dimple_proto::v1::dimple_client::DimpleClient;

fn dimple() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dimple"));
    c.env("DIMPLE_LOG", "warn");
    c
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Kills the process when the test ends, however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> Proc {
    Proc(
        dimple()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

fn wait_listening(p: &mut Proc, addr: SocketAddr, what: &str) {
    let t = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what} did not start listening"
        );
        assert!(p.0.try_wait().unwrap().is_none(), "{what} exited early");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The demo model's directory plus a chat template of its own, so that a router reading the
/// wrong files (the built-in defaults) tokenises differently.
fn model_dir_with_own_template() -> PathBuf {
    let src = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/dimple-demo"
    ));
    let dir = std::env::temp_dir().join(format!("dimple-router-assets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let template = dimple_router::prompt::QWEN2_VL_CHAT_TEMPLATE.replace(
        "You are a helpful assistant.",
        "Answer with one word: a colour or a shape.",
    );
    assert_ne!(template, dimple_router::prompt::QWEN2_VL_CHAT_TEMPLATE);
    std::fs::write(dir.join("chat_template.jinja"), template).unwrap();
    dir
}

async fn tokenize_chat(router: SocketAddr) -> Vec<u32> {
    let mut client = DimpleClient::connect(format!("http://{router}"))
        .await
        .unwrap();
    let chat = v1::Chat {
        messages: vec![v1::ChatMessage {
            role: "user".into(),
            content: vec![v1::ContentPart {
                part: Some(v1::content_part::Part::Text(
                    "What color is the square?".into(),
                )),
            }],
        }],
    };
    client
        .tokenize(v1::TokenizeRequest {
            input: Some(v1::tokenize_request::Input::Chat(chat)),
            allow_special_tokens: false,
        })
        .await
        .unwrap()
        .into_inner()
        .ids
}

#[test]
fn router_fetches_prompt_assets_from_a_worker_that_starts_later() {
    let dir = model_dir_with_own_template();
    let (worker_addr, worker_metrics) = (free_addr(), free_addr());
    let workers = worker_addr.to_string();

    // The router starts first: it must wait for the worker, not fall back to defaults.
    let fetched_addr = free_addr();
    let mut fetched = spawn(&[
        "router",
        "--assets-from-workers",
        "--workers",
        &workers,
        "--listen",
        &fetched_addr.to_string(),
        "--metrics-listen",
        &free_addr().to_string(),
    ]);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        TcpStream::connect(fetched_addr).is_err(),
        "the router served before it had the model's tokenizer"
    );
    assert!(
        fetched.0.try_wait().unwrap().is_none(),
        "the router gave up waiting for a worker"
    );

    let mut worker = spawn(&[
        "worker",
        "--device",
        "cpu",
        "--model",
        dir.to_str().unwrap(),
        "--listen",
        &workers,
        "--metrics-listen",
        &worker_metrics.to_string(),
    ]);
    wait_listening(&mut worker, worker_addr, "the worker");
    wait_listening(&mut fetched, fetched_addr, "the router with fetched assets");

    let local_addr = free_addr();
    let mut local = spawn(&[
        "router",
        "--model",
        dir.to_str().unwrap(),
        "--workers",
        &workers,
        "--listen",
        &local_addr.to_string(),
        "--metrics-listen",
        &free_addr().to_string(),
    ]);
    wait_listening(&mut local, local_addr, "the router with --model");
    let builtin_addr = free_addr();
    let mut builtin = spawn(&[
        "router",
        "--workers",
        &workers,
        "--listen",
        &builtin_addr.to_string(),
        "--metrics-listen",
        &free_addr().to_string(),
    ]);
    wait_listening(
        &mut builtin,
        builtin_addr,
        "the router with built-in assets",
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (got, want, default) = rt.block_on(async {
        (
            tokenize_chat(fetched_addr).await,
            tokenize_chat(local_addr).await,
            tokenize_chat(builtin_addr).await,
        )
    });
    std::fs::remove_dir_all(&dir).unwrap();
    assert_ne!(want, default, "the test's chat template changes nothing");
    assert_eq!(
        got, want,
        "fetched assets tokenise differently from the model directory"
    );
}

#[test]
fn router_refuses_assets_from_workers_together_with_model() {
    let out = dimple()
        .args([
            "router",
            "--assets-from-workers",
            "--model",
            "/nonexistent",
            "--workers",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--assets-from-workers") && err.contains("--model"),
        "{err}"
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn worker_with_device_cuda_refuses_to_start_without_cuda() {
    let t = Instant::now();
    let out = dimple()
        .args([
            "worker",
            "--device",
            "cuda",
            "--tp",
            "1",
            "--listen",
            &free_addr().to_string(),
            "--metrics-listen",
            &free_addr().to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a CPU-only build served with `--device cuda`"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`--device cuda`") && err.contains("without CUDA support"),
        "unclear error: {err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "refused only after loading the model"
    );
}
