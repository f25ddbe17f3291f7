//! The `dimple` binary as a user runs it: `dimple serve` on the built-in demo model, then
//! `dimple generate --router` against it gives exactly what in-process `dimple generate`
//! gives (answer, response ids and the whole step history), `/metrics` answers, and SIGTERM
//! stops the server cleanly.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

fn json_of(out: std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn serve_then_generate_through_the_router() {
    let (listen, metrics) = (free_addr(), free_addr());
    let mut server = dimple()
        .args([
            "serve",
            "--listen",
            &listen.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
            // Tests run side by side: no fixed HTTP port.
            "--http-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while TcpStream::connect(listen).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "`dimple serve` did not start listening"
        );
        assert!(
            server.try_wait().unwrap().is_none(),
            "`dimple serve` exited early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let question = "What color is the square?";
    let remote = json_of(
        dimple()
            .args([
                "generate",
                "--router",
                &format!("http://{listen}"),
                "--json",
                question,
            ])
            .output()
            .unwrap(),
    );
    let local = json_of(
        dimple()
            .args(["generate", "--json", question])
            .output()
            .unwrap(),
    );
    for field in ["response_ids", "history", "steps", "finish_reason", "text"] {
        assert_eq!(
            remote[field], local[field],
            "`{field}` differs between --router and in-process"
        );
    }
    assert!(!remote["text"].as_str().unwrap().is_empty());

    let mut s = TcpStream::connect(metrics).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    assert!(page.starts_with("HTTP/1.1 200"));
    let ok_line = "dimple_router_requests_total{outcome=\"ok\",rpc=\"generate_stream\"} 1";
    assert!(page.contains(ok_line), "{page}");
    assert!(page.contains("dimple_engine_forward_passes_total"));

    let kill = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "`dimple serve` did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    server
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "exit {status}: {err}");
}
