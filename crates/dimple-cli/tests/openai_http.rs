//! The OpenAI-compatible HTTP API as real clients use it: the server that `dimple serve`
//! runs (the built-in demo model decoded in-process behind the front-end, gRPC and HTTP on
//! 127.0.0.1:0, API keys on) answers the official `openai` Python package — completions
//! with an image as a data URI, streaming, the models list, a bad request, a wrong key —
//! with exactly the answers its gRPC API gives for the same requests. Health, readiness,
//! tokenisation offsets and errors are checked over plain HTTP.
//!
//! The Python comes from `DIMPLE_TEST_PYTHON` (`.ci/run` makes a virtual environment with a
//! pinned `openai`); the test fails when it is unset or cannot import `openai`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use dimple_engine::EngineConfig;
use dimple_model::preprocess::PreprocessConfig;
use dimple_proto::v1;
use dimple_proto::v1::dimple_client::DimpleClient;
use dimple_router::prompt::PromptBuilder;
use dimple_router::{ApiKeys, Router, RouterConfig};
use dimple_worker::{LocalBackend, Worker};
use prometheus::Registry;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const KEY: &str = "test-key";

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(rel)
}

fn python() -> String {
    let python = std::env::var("DIMPLE_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "DIMPLE_TEST_PYTHON is not set: point it at a Python with the `openai` package \
             (.ci/run creates one under ~/.cache/dimple-py)"
        )
    });
    let out = std::process::Command::new(&python)
        .args(["-c", "import openai; print(openai.__version__)"])
        .output()
        .unwrap_or_else(|e| panic!("DIMPLE_TEST_PYTHON={python} does not run: {e}"));
    assert!(
        out.status.success(),
        "DIMPLE_TEST_PYTHON={python} cannot import openai: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    python
}

struct Server {
    grpc: SocketAddr,
    http: SocketAddr,
    /// Begins the gRPC server's drain (the HTTP server keeps serving).
    drain: tokio::sync::oneshot::Sender<()>,
}

/// The front-end `dimple serve` assembles: the built-in model in this process, API keys on.
fn router() -> Router {
    let pre = PreprocessConfig::from_json(dimple_core::builtin::PREPROCESSOR_CONFIG_JSON).unwrap();
    let images = dimple_worker::image_limits(&pre);
    let registry = Registry::new();
    let worker = Worker::builtin(EngineConfig::default(), &registry).unwrap();
    let cfg = RouterConfig {
        images,
        api_keys: ApiKeys::new(vec![KEY.into()]),
        ..RouterConfig::default()
    };
    Router::with_backend(
        PromptBuilder::builtin().unwrap(),
        cfg,
        Arc::new(LocalBackend::new(worker)),
        &registry,
    )
    .unwrap()
}

/// What `dimple serve` assembles, on ephemeral ports.
async fn start() -> Server {
    let router = router();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (drain, drained) = tokio::sync::oneshot::channel::<()>();
    let server = Server {
        grpc: grpc.local_addr().unwrap(),
        http: http.local_addr().unwrap(),
        drain,
    };
    tokio::spawn(dimple_router::serve_http(
        http,
        router.http_api(),
        std::future::pending(),
    ));
    tokio::spawn(dimple_router::serve(grpc, router, async {
        let _ = drained.await;
    }));
    server
}

/// One HTTP/1.1 exchange: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, auth: bool, body: &str) -> (u16, String) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange(s, method, path, auth, body).await
}

/// One HTTP/1.1 exchange over `s`: (status, body).
async fn exchange(
    mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    method: &str,
    path: &str,
    auth: bool,
    body: &str,
) -> (u16, String) {
    let auth = if auth {
        format!("Authorization: Bearer {KEY}\r\n")
    } else {
        String::new()
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap();
    (status, body)
}

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    r
}

/// A chat request in both shapes: gRPC, and the OpenAI JSON `messages` with the image as a
/// data URI.
fn case(question: &str, image: Option<&[u8]>) -> (v1::GenerateRequest, Value) {
    let mut grpc_parts = Vec::new();
    let mut json_parts = Vec::new();
    if let Some(png) = image {
        grpc_parts.push(v1::ContentPart {
            part: Some(v1::content_part::Part::Image(v1::Image {
                data: png.to_vec(),
            })),
        });
        let uri = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(png)
        );
        json_parts.push(json!({"type": "image_url", "image_url": {"url": uri}}));
    }
    grpc_parts.push(v1::ContentPart {
        part: Some(v1::content_part::Part::Text(question.into())),
    });
    json_parts.push(json!({"type": "text", "text": question}));
    let req = v1::GenerateRequest {
        input: Some(v1::generate_request::Input::Chat(v1::Chat {
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: grpc_parts,
            }],
        })),
        ..Default::default()
    };
    (req, json!([{"role": "user", "content": json_parts}]))
}

fn finish_reason(r: &v1::GenerateResponse) -> &'static str {
    match v1::AnswerEnd::try_from(r.answer_end) {
        Ok(v1::AnswerEnd::Length) => "length",
        Ok(v1::AnswerEnd::EndToken | v1::AnswerEnd::StopSequence) => "stop",
        other => panic!("unexpected answer_end {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_package_gets_the_grpc_answers() {
    let python = python();
    let server = start().await;
    let mut client = DimpleClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let png = std::fs::read(repo("tests/fixtures/demo_eval/images/0004.png")).unwrap();

    // Each case: OpenAI-side settings, and the same settings on the gRPC request.
    let mut cases = Vec::new();
    let mut add = |name: &str,
                   (mut req, messages): (v1::GenerateRequest, Value),
                   max_tokens: u32,
                   stop: Option<&str>,
                   dimple: Option<Value>| {
        let d = dimple.clone().unwrap_or(json!({}));
        req.params = Some(v1::DecodeParams {
            max_new_tokens: Some(max_tokens),
            threshold: d["threshold"].as_f64().map(|t| t as f32),
            use_cache: d["use_cache"].as_bool(),
            stop: stop.map(|s| vec![s.to_owned()]).unwrap_or_default(),
            ..Default::default()
        });
        let mut c = json!({"name": name, "messages": messages, "max_tokens": max_tokens});
        if let Some(s) = stop {
            c["stop"] = json!(s);
        }
        if let Some(d) = dimple {
            c["dimple"] = d;
        }
        cases.push((req, c));
    };
    add(
        "image",
        case("What color is the square?", Some(&png)),
        16,
        None,
        None,
    );
    add(
        "text-confident-cached",
        case("What is 3 plus 4?", None),
        16,
        None,
        Some(json!({"threshold": 0.9, "use_cache": true})),
    );
    add(
        "one-slot",
        case("How many shapes are there?", Some(&png)),
        1,
        None,
        None,
    );

    let mut spec = Vec::new();
    for (req, mut c) in cases {
        let got = client
            .generate(authed(req.clone()))
            .await
            .unwrap()
            .into_inner();
        assert!(!got.text.is_empty(), "{}: empty gRPC answer", c["name"]);
        c["expect"] = json!({
            "text": got.text,
            "token_ids": got.token_ids,
            "finish_reason": finish_reason(&got),
            "prompt_tokens": got.prompt_tokens,
            "completion_tokens": got.completion_tokens,
            "steps": got.steps,
        });
        spec.push(c);
        // A stop string taken from inside the answer cuts it there (same on both APIs).
        if spec.len() == 1 {
            let text = got.text.clone();
            let cut: String = text.chars().skip(1).take(2).collect();
            let mut stopped = req.clone();
            stopped.params.as_mut().unwrap().stop = vec![cut.clone()];
            let s = client
                .generate(authed(stopped.clone()))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(s.answer_end, v1::AnswerEnd::StopSequence as i32);
            assert_eq!(s.text, text[..text.find(&cut).unwrap()].trim_end());
            assert_eq!(
                s.token_ids, got.token_ids,
                "stop strings do not change decoding"
            );
            let mut c = spec[0].clone();
            c["name"] = json!("image-stop");
            c["stop"] = json!(cut);
            c["expect"]["text"] = json!(s.text);
            spec.push(c);
        }
    }
    let dir = std::env::temp_dir().join(format!("dimple-openai-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases_path = dir.join("cases.json");
    std::fs::write(
        &cases_path,
        json!({"model": dimple_core::builtin::NAME, "cases": spec}).to_string(),
    )
    .unwrap();
    let base_url = format!("http://{}/v1", server.http);
    let script = repo("tests/openai/check_openai.py");
    let args = (python, script, base_url, cases_path);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&args.0)
            .arg(&args.1)
            .arg(&args.2)
            .arg(KEY)
            .arg(&args.3)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("ok: "),
        "openai client checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Probes need no key; everything else does.
    assert_eq!(http(server.http, "GET", "/health", false, "").await.0, 200);
    assert_eq!(http(server.http, "GET", "/ready", false, "").await.0, 200);
    let (status, body) = http(server.http, "GET", "/v1/models", false, "").await;
    assert_eq!(status, 401);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "UNAUTHENTICATED");

    // Tokenize: byte offsets, and pieces that spell the text (no replacement characters).
    let text = "hi 你好";
    let (status, body) = http(
        server.http,
        "POST",
        "/tokenize",
        true,
        &json!({"text": text}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let t: Value = serde_json::from_str(&body).unwrap();
    let grpc = client
        .tokenize(authed(v1::TokenizeRequest {
            input: Some(v1::tokenize_request::Input::Text(text.into())),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<u32> = serde_json::from_value(t["ids"].clone()).unwrap();
    assert_eq!(ids, grpc.ids);
    let tokens: Vec<String> = serde_json::from_value(t["tokens"].clone()).unwrap();
    assert_eq!(tokens, grpc.tokens);
    assert_eq!(tokens.concat(), text);
    let last = grpc.offsets.last().unwrap();
    assert_eq!(last.end as usize, text.len());

    // The same error, with the same code, on both APIs.
    let (status, body) = http(
        server.http,
        "POST",
        "/v1/chat/completions",
        true,
        &json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}).to_string(),
    )
    .await;
    assert_eq!(status, 400);
    let body: Value = serde_json::from_str(&body).unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    let mut bad = case("x", None).0;
    if let Some(v1::generate_request::Input::Chat(c)) = bad.input.as_mut() {
        c.messages[0].role = "tool".into();
    }
    let s = client.generate(authed(bad)).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert_eq!(s.message(), msg);

    // Draining (SIGTERM) turns readiness off at once; liveness stays.
    server.drain.send(()).unwrap();
    let t = std::time::Instant::now();
    while http(server.http, "GET", "/ready", false, "").await.0 != 503 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "still ready while draining"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(http(server.http, "GET", "/health", false, "").await.0, 200);
}

/// The HTTP API over TLS (`dimple router --http-tls`): the same answers as plain HTTP for a
/// client that trusts the certificate's CA, keys still checked, no plain-HTTP answer on the
/// TLS port, and a certificate that does not parse refused before serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_over_tls_answers_as_plain_http_does() {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    let fixture = |name: &str| std::fs::read(repo(&format!("tests/fixtures/tls/{name}"))).unwrap();
    let identity = dimple_router::TlsIdentity {
        cert_pem: fixture("server.crt"),
        key_pem: fixture("server.key"),
    };
    let junk = dimple_router::TlsIdentity {
        cert_pem: b"not a certificate".to_vec(),
        key_pem: fixture("server.key"),
    };
    assert!(dimple_router::HttpsIdentity::new(&junk).is_err());

    let router = router();
    let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (plain_addr, tls_addr) = (plain.local_addr().unwrap(), tls.local_addr().unwrap());
    tokio::spawn(dimple_router::serve_http(
        plain,
        router.http_api(),
        std::future::pending(),
    ));
    tokio::spawn(dimple_router::serve_https(
        tls,
        router.http_api(),
        dimple_router::HttpsIdentity::new(&identity).unwrap(),
        std::future::pending(),
    ));

    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&fixture("ca.crt")).unwrap())
        .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let https = |method: &'static str, path: &'static str, auth: bool, body: String| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let s = connector.connect(name, tcp).await.expect("TLS handshake");
            exchange(s, method, path, auth, &body).await
        }
    };

    assert_eq!(https("GET", "/health", false, String::new()).await.0, 200);
    let chat = json!({
        "model": "dimple-demo",
        "messages": [{"role": "user", "content": "What color is the square?"}],
        "max_tokens": 8,
        "seed": 1,
    })
    .to_string();
    let (status, over_tls) = https("POST", "/v1/chat/completions", true, chat.clone()).await;
    assert_eq!(status, 200, "{over_tls}");
    let (status, over_plain) = http(plain_addr, "POST", "/v1/chat/completions", true, &chat).await;
    assert_eq!(status, 200, "{over_plain}");
    let content = |body: &str| {
        let v: Value = serde_json::from_str(body).unwrap();
        v["choices"][0]["message"]["content"].clone()
    };
    assert!(content(&over_tls).is_string(), "{over_tls}");
    assert_eq!(content(&over_tls), content(&over_plain));
    assert_eq!(
        https("POST", "/v1/chat/completions", false, chat).await.0,
        401
    );

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut s = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(15), s.read_to_end(&mut buf)).await;
    assert!(
        !buf.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
}
