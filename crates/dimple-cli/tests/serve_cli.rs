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

/// The gRPC health status (as its number) of `service` on `addr`.
async fn health(addr: SocketAddr, service: &str) -> i32 {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("metrics answer");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    page
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_drains_with_probes_and_metrics_up() {
    use dimple_proto::v1;
    use std::io::BufRead;
    use tonic_health::pb::health_check_response::ServingStatus;

    let (listen, probes) = (free_addr(), free_addr());
    let mut server = dimple()
        .args(["serve", "--listen", &listen.to_string()])
        .args(["--metrics-listen", "127.0.0.1:0"])
        // Tests run side by side: no fixed HTTP port.
        .args(["--http-listen", "127.0.0.1:0"])
        .args(["--health-listen", &probes.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The banner names the metrics port actually bound, not `:0`.
    let mut stderr = std::io::BufReader::new(server.stderr.take().unwrap());
    let mut banner = String::new();
    while !banner.starts_with("dimple serve:") {
        banner.clear();
        assert!(stderr.read_line(&mut banner).unwrap() > 0, "no banner");
    }
    let metrics: SocketAddr = banner
        .split("http://")
        .nth(1)
        .and_then(|r| r.split("/metrics").next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {banner:?}"));
    assert_ne!(metrics.port(), 0, "{banner}");

    let serving = ServingStatus::Serving as i32;
    let t = Instant::now();
    while health(probes, "dimple.v1.Dimple").await != serving {
        assert!(t.elapsed() < Duration::from_secs(10), "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = v1::dimple_client::DimpleClient::connect(format!("http://{listen}"))
        .await
        .unwrap();
    let req = v1::GenerateRequest {
        input: Some(v1::generate_request::Input::Text("a b c".into())),
        params: Some(v1::DecodeParams {
            max_new_tokens: Some(150),
            steps: Some(150),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.generate_stream(req).await.unwrap().into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    let kill = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());

    // Draining: not ready, still alive, and the metrics say so.
    let not_serving = ServingStatus::NotServing as i32;
    let t = Instant::now();
    while health(probes, "dimple.v1.Dimple").await != not_serving {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "still ready while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(health(probes, "").await, serving, "alive while draining");
    let page = scrape(metrics);
    assert!(page.contains("\ndimple_router_draining 1"), "{page}");
    assert!(page.contains("\ndimple_worker_draining 1"), "{page}");

    // The running request finishes, then the process exits cleanly.
    let mut last = None;
    while let Some(msg) = stream.message().await.unwrap() {
        last = msg.event;
    }
    assert!(
        matches!(last, Some(v1::generate_stream_response::Event::Final(f)) if f.token_ids.len() == 150)
    );
    let t = Instant::now();
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no exit after the drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit {status}");
}

#[test]
fn a_tokenizer_beyond_the_models_vocabulary_is_refused_at_start_up() {
    // The golden model (vocabulary of 384) with the full Qwen tokenizer (151,667 ids).
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let dir = std::env::temp_dir().join(format!("dimple-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(repo.join("golden").join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(
        repo.join("tokenizer/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let model_vocab = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(dir.join("config.json")).unwrap(),
    )
    .unwrap()["vocab_size"]
        .as_u64()
        .unwrap();
    for cmd in ["worker", "serve"] {
        let out = dimple()
            .args([cmd, "--listen", &free_addr().to_string()])
            .args(["--metrics-listen", "127.0.0.1:0", "--model"])
            .arg(&dir)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd} started: {err}");
        assert!(
            err.contains("151667 ids") && err.contains(&format!("only {model_vocab}")),
            "{cmd}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_compressed_requests_are_accepted() {
    use dimple_proto::v1;
    let listen = free_addr();
    let mut server = dimple()
        .args(["serve", "--listen", &listen.to_string()])
        .args(["--metrics-listen", "127.0.0.1:0"])
        // Tests run side by side: no fixed HTTP port.
        .args(["--http-listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mut client = loop {
        if let Ok(c) = v1::dimple_client::DimpleClient::connect(format!("http://{listen}")).await {
            break c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "`dimple serve` did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let answer = client
        .generate(v1::GenerateRequest {
            input: Some(v1::generate_request::Input::Text("a b c ".repeat(50))),
            ..Default::default()
        })
        .await;
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        !answer
            .expect("a gzip request is served")
            .into_inner()
            .token_ids
            .is_empty()
    );
}

/// The first `n` lines `dimple serve` writes to stderr at info level with `extra` flags.
fn serve_log_lines(extra: &[&str], n: usize) -> Vec<String> {
    use std::io::BufRead;
    let mut server = dimple()
        .env("DIMPLE_LOG", "info")
        .args(extra)
        .args(["serve", "--listen", &free_addr().to_string()])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(["--http-listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(server.stderr.take().unwrap());
    let mut lines = Vec::new();
    while lines.len() < n {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        lines.push(line);
    }
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(lines.len(), n, "{lines:?}");
    lines
}

#[test]
fn logs_carry_no_colour_codes_off_a_terminal_and_can_be_json() {
    let text = serve_log_lines(&[], 3);
    assert!(
        text.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes in piped logs: {text:?}"
    );
    let json = serve_log_lines(&["--log-format", "json"], 3);
    let logs: Vec<serde_json::Value> = json
        .iter()
        .filter(|l| !l.starts_with("dimple serve:"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(!logs.is_empty());
    for l in &logs {
        assert!(l["level"].is_string() && l["target"].is_string(), "{l}");
        assert!(l["fields"]["message"].is_string(), "{l}");
    }
}
