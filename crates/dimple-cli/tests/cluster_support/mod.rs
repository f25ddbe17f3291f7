//! In-process clusters on 127.0.0.1 for the serving tests: workers over the golden tiny
//! model (each on its own tokio runtime, so a test can kill one as abruptly as a crashed
//! process: its connections drop mid-stream), a router in front of them, clients, metric
//! scrapes, and the golden generation cases as public requests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use dimple_engine::{EngineConfig, FaultInjection, GroupConfig};
use dimple_model::preprocess::PreprocessConfig;
use dimple_model::{Checkpoint, DimpleModel};
use dimple_proto::v1;
use dimple_proto::v1::dimple_client::DimpleClient;
use dimple_router::prompt::PromptBuilder;
use dimple_router::validate::ImageLimits;
use dimple_router::{Discovery, Router, RouterConfig};
use dimple_worker::{EtcdConfig, ServeOptions, Worker, WorkerConfig};
use prometheus::Registry;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub fn fixture(path: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(path)
}

pub fn golden(name: &str) -> PathBuf {
    fixture("golden").join(name)
}

pub const GOLDEN_MASK_ID: u32 = 301;

/// Engine limits small enough for fast tests.
pub fn engine_config() -> EngineConfig {
    EngineConfig {
        max_prompt_tokens: 256,
        ..EngineConfig::default()
    }
}

fn worker_config() -> WorkerConfig {
    WorkerConfig {
        model_name: "golden".into(),
        default_max_new_tokens: 16,
        preprocess: PreprocessConfig::default(),
        tp: 1,
    }
}

/// A worker on its own runtime.
pub struct WorkerProc {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub worker: Worker,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), dimple_worker::WorkerError>>>,
}

impl WorkerProc {
    pub fn start(cfg: EngineConfig, etcd: Option<EtcdConfig>) -> Self {
        let model =
            DimpleModel::load(&golden(""), DType::F32, &Device::Cpu).expect("golden model loads");
        let registry = Registry::new();
        let worker = Worker::start(model, cfg, worker_config(), &registry).expect("worker starts");
        Self::serve(
            worker,
            registry,
            etcd,
            ServeOptions::default().step_watchdog,
            None,
        )
    }

    /// A worker whose engine fails as `fault` says (a one-rank group over the golden model).
    pub fn start_faulty(
        cfg: EngineConfig,
        fault: FaultInjection,
        etcd: Option<EtcdConfig>,
    ) -> Self {
        Self::start_faulty_watched(cfg, fault, etcd, ServeOptions::default().step_watchdog)
    }

    /// [`Self::start_faulty`] with the step watchdog at `step_watchdog`.
    pub fn start_faulty_watched(
        cfg: EngineConfig,
        fault: FaultInjection,
        etcd: Option<EtcdConfig>,
        step_watchdog: Option<Duration>,
    ) -> Self {
        let registry = Registry::new();
        let group = GroupConfig {
            fault: Some(fault),
            ..GroupConfig::cpu(1)
        };
        let worker = Worker::start_group(
            &Checkpoint::Dir(golden("")),
            group,
            cfg,
            worker_config(),
            &registry,
        )
        .expect("worker starts");
        Self::serve(worker, registry, etcd, step_watchdog, None)
    }

    /// A worker that speaks only mutual TLS.
    pub fn start_tls(cfg: EngineConfig, tls: dimple_proto::tls::InternalTls) -> Self {
        let model =
            DimpleModel::load(&golden(""), DType::F32, &Device::Cpu).expect("golden model loads");
        let registry = Registry::new();
        let worker = Worker::start(model, cfg, worker_config(), &registry).expect("worker starts");
        Self::serve(
            worker,
            registry,
            None,
            ServeOptions::default().step_watchdog,
            Some(tls),
        )
    }

    fn serve(
        worker: Worker,
        registry: Registry,
        etcd: Option<EtcdConfig>,
        step_watchdog: Option<Duration>,
        tls: Option<dimple_proto::tls::InternalTls>,
    ) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        // Bound with std (the caller may be inside another runtime, where block_on panics)
        // and handed to this runtime's reactor.
        let bind = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.set_nonblocking(true).unwrap();
            l
        };
        let (listener, metrics) = {
            let _inside = runtime.enter();
            (
                TcpListener::from_std(bind()).unwrap(),
                TcpListener::from_std(bind()).unwrap(),
            )
        };
        let addr = listener.local_addr().unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let w = worker.clone();
        let render: dimple_proto::telemetry::Render = std::sync::Arc::new(move || {
            w.refresh_metrics();
            dimple_proto::telemetry::render_registry(&registry)
        });
        runtime.spawn(dimple_proto::telemetry::serve_metrics(
            metrics,
            render,
            std::future::pending(),
        ));
        let opts = ServeOptions {
            etcd,
            advertise_addr: addr.to_string(),
            drain_timeout: Duration::from_secs(10),
            step_watchdog,
            tls,
            ..ServeOptions::default()
        };
        let served = runtime.spawn(dimple_worker::serve(
            listener,
            worker.clone(),
            opts,
            async {
                let _ = stop_rx.await;
            },
        ));
        Self {
            addr,
            metrics_addr,
            worker,
            runtime: Some(runtime),
            stop: Some(stop),
            served: Some(served),
        }
    }

    /// Waits (at most `within`) for the server to end by itself, and returns how it ended.
    pub async fn ended(&mut self, within: Duration) -> Result<(), dimple_worker::WorkerError> {
        let h = self.served.take().expect("the server is running");
        tokio::time::timeout(within, h)
            .await
            .expect("the worker server ends in time")
            .expect("the server task completes")
    }

    /// Dies like a killed process: every task and connection of the worker goes at once,
    /// nothing is deregistered.
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        self.worker.shutdown();
    }

    /// SIGTERM: drain (deregister, finish running requests) and wait for the server to end.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.served.take() {
            tokio::time::timeout(Duration::from_secs(15), h)
                .await
                .expect("worker drains in time")
                .unwrap()
                .unwrap();
        }
        self.kill();
    }

    pub async fn metrics(&self) -> String {
        scrape(self.metrics_addr).await
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A router serving on the test's runtime.
pub struct RouterProc {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub pool: dimple_router::pool::WorkerPool,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), dimple_router::RouterError>>>,
}

pub fn router_config(discovery: Discovery) -> RouterConfig {
    RouterConfig {
        discovery,
        images: ImageLimits::default(),
        poll_interval: Duration::from_millis(200),
        drain_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_millis(500),
        ..RouterConfig::default()
    }
}

impl RouterProc {
    /// A router serving on a loopback port; with static discovery, once its pool holds the
    /// listed workers (the pool is filled by a task of its own).
    pub async fn start(cfg: RouterConfig) -> Self {
        let statics = match &cfg.discovery {
            Discovery::Static(addrs) => Some(addrs.clone()),
            _ => None,
        };
        let registry = Registry::new();
        let router =
            Router::new(PromptBuilder::builtin().unwrap(), cfg, &registry).expect("router builds");
        let pool = router.pool().clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let refresh = router.metrics_refresher();
        let render: dimple_proto::telemetry::Render = std::sync::Arc::new(move || {
            refresh();
            dimple_proto::telemetry::render_registry(&registry)
        });
        tokio::spawn(dimple_proto::telemetry::serve_metrics(
            metrics,
            render,
            std::future::pending(),
        ));
        let (stop, stop_rx) = oneshot::channel::<()>();
        let served = tokio::spawn(dimple_router::serve(listener, router, async {
            let _ = stop_rx.await;
        }));
        let router = Self {
            addr,
            metrics_addr,
            pool,
            stop: Some(stop),
            served: Some(served),
        };
        if let Some(addrs) = statics {
            router.wait_for_addrs(addrs, Duration::from_secs(5)).await;
        }
        router
    }

    pub async fn client(&self) -> DimpleClient<Channel> {
        DimpleClient::connect(format!("http://{}", self.addr))
            .await
            .expect("router accepts connections")
    }

    pub async fn metrics(&self) -> String {
        scrape(self.metrics_addr).await
    }

    /// Waits until the router knows exactly `addrs` (order ignored).
    pub async fn wait_for_workers(&self, addrs: &[SocketAddr], within: Duration) {
        self.wait_for_addrs(addrs.iter().map(|a| a.to_string()).collect(), within)
            .await;
    }

    async fn wait_for_addrs(&self, mut want: Vec<String>, within: Duration) {
        want.sort();
        want.dedup();
        let t = Instant::now();
        loop {
            let mut got = self.pool.addrs();
            got.sort();
            if got == want {
                return;
            }
            assert!(
                t.elapsed() < within,
                "router knows {got:?}, expected {want:?} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn begin_shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    pub async fn stopped(&mut self) {
        if let Some(h) = self.served.take() {
            tokio::time::timeout(Duration::from_secs(15), h)
                .await
                .expect("router drains in time")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for RouterProc {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

/// A router over `n` fresh workers (static list).
pub async fn cluster(n: usize, cfg: EngineConfig) -> (RouterProc, Vec<WorkerProc>) {
    let workers: Vec<WorkerProc> = (0..n)
        .map(|_| WorkerProc::start(cfg.clone(), None))
        .collect();
    let addrs = workers.iter().map(|w| w.addr.to_string()).collect();
    let router = RouterProc::start(router_config(Discovery::Static(addrs))).await;
    (router, workers)
}

/// The gRPC health status (as its number) of `service` on `addr` (`""`: the process).
pub async fn health(addr: SocketAddr, service: &str) -> i32 {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(channel);
    h.check(HealthCheckRequest {
        service: service.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .status
}

/// `GET /metrics` over plain HTTP/1.1.
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics endpoint up");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The value of a metric with exactly these labels (`name{labels}` as written by the
/// exporter), or the unlabelled one with `labels` empty.
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    let key = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.rsplit_once(' ')
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v.parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("metric {key} not found"))
}

/// One single-request golden generation as a public request, and the reference result.
pub struct GoldenCase {
    pub name: String,
    pub request: v1::GenerateRequest,
    pub initial: Vec<u32>,
    /// Response row after each step.
    pub history: Vec<Vec<u32>>,
    pub steps_taken: usize,
}

pub fn golden_cases() -> Vec<GoldenCase> {
    let mut names: Vec<String> = std::fs::read_dir(golden(""))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen_") && n.ends_with(".json") && !n.starts_with("gen_batch"))
        .map(|n| n.trim_end_matches(".json").to_owned())
        .collect();
    names.sort();
    assert!(
        names.len() >= 30,
        "expected the full golden set, found {}",
        names.len()
    );
    names.iter().map(|n| golden_case(n)).collect()
}

pub fn golden_case(name: &str) -> GoldenCase {
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(golden(&format!("{name}.json"))).unwrap())
            .unwrap();
    let t = candle_core::safetensors::load(golden(&format!("{name}.safetensors")), &Device::Cpu)
        .unwrap();
    let p = &json["params"];
    let n = p["max_new_tokens"].as_u64().unwrap() as usize;
    let params = v1::DecodeParams {
        max_new_tokens: Some(n as u32),
        steps: Some(p["steps"].as_u64().unwrap() as u32),
        threshold: p["alg_p_threshold"].as_f64().map(|x| x as f32),
        alg: p["alg"].as_str().unwrap().to_owned(),
        pipeline: p["decoding_pipeline"].as_str().unwrap().to_owned(),
        temperature: Some(p["temperature"].as_f64().unwrap() as f32),
        use_original_confidence: Some(p["use_original_confidence"].as_bool().unwrap()),
        use_cache: Some(p["use_cache"].as_bool().unwrap()),
        ..Default::default()
    };
    let mut fixed: Vec<(u32, u32)> = json["tokens_hook"]["fixed_response_positions"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap() as u32))
                .collect()
        })
        .unwrap_or_default();
    fixed.sort();
    let prior = (!fixed.is_empty()).then(|| v1::StructurePrior {
        prior: Some(v1::structure_prior::Prior::Fixed(v1::FixedTokens {
            tokens: fixed
                .iter()
                .map(|&(position, token_id)| v1::FixedToken { position, token_id })
                .collect(),
        })),
    });
    let ids: Vec<u32> = json["input_ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let images = match json["pixel_values_source"].as_str() {
        None => Vec::new(),
        Some(src) => {
            assert!(
                src.contains("image1") && !src.contains("image2"),
                "unexpected source {src}"
            );
            vec![v1::Image {
                data: std::fs::read(golden("image1.png")).unwrap(),
            }]
        }
    };
    let hist = t["history"].to_dtype(DType::I64).unwrap();
    let (steps, b, l) = hist.dims3().unwrap();
    assert_eq!(b, 1);
    let flat: Vec<i64> = hist.flatten_all().unwrap().to_vec1().unwrap();
    let history = (0..steps)
        .map(|s| {
            flat[s * l + l - n..(s + 1) * l]
                .iter()
                .map(|&x| x as u32)
                .collect()
        })
        .collect();
    let mut initial = vec![GOLDEN_MASK_ID; n];
    for &(p, t) in &fixed {
        initial[p as usize] = t;
    }
    GoldenCase {
        name: name.to_owned(),
        request: v1::GenerateRequest {
            input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                ids,
                images,
            })),
            params: Some(params),
            prior,
            stream: Some(v1::StreamOptions {
                include_canvas: true,
                mask_placeholder: String::new(),
            }),
            request_id: name.to_owned(),
            allow_special_tokens: false,
        },
        initial,
        history,
        steps_taken: json["steps_taken"].as_u64().unwrap() as usize,
    }
}

/// What a streaming client saw.
#[derive(Debug)]
pub struct Streamed {
    pub started: v1::Started,
    /// The response after each step, rebuilt from the committed slots.
    pub history: Vec<Vec<u32>>,
    pub updates: Vec<v1::StepUpdate>,
    pub last: v1::GenerateResponse,
}

/// Runs a streaming request to the end.
pub async fn stream_all(
    client: &mut DimpleClient<Channel>,
    req: v1::GenerateRequest,
) -> Result<Streamed, tonic::Status> {
    use v1::generate_stream_response::Event;
    let mut stream = client.generate_stream(req).await?.into_inner();
    let Some(v1::GenerateStreamResponse {
        event: Some(Event::Started(started)),
    }) = stream.message().await?
    else {
        panic!("the first message is `started`");
    };
    let mut row = started.initial_ids.clone();
    let mut history = Vec::new();
    let mut updates = Vec::new();
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(Event::Step(s)) => {
                assert_eq!(s.step as usize, history.len(), "steps arrive in order");
                for c in &s.committed {
                    row[c.position as usize] = c.token_id;
                }
                history.push(row.clone());
                updates.push(s);
            }
            Some(Event::Final(last)) => {
                assert!(
                    stream.message().await?.is_none(),
                    "nothing follows the final message"
                );
                return Ok(Streamed {
                    started,
                    history,
                    updates,
                    last,
                });
            }
            other => panic!("unexpected message {other:?}"),
        }
    }
    panic!("the stream ended without a final message");
}

/// A text request for the golden model (token ids of a golden prompt, no images).
pub fn small_request(max_new_tokens: u32) -> v1::GenerateRequest {
    let mut r = golden_case("gen_text_n16_thr0p9_cache0").request;
    let p = r.params.as_mut().unwrap();
    p.max_new_tokens = Some(max_new_tokens);
    p.steps = Some(max_new_tokens);
    r
}

/// Certificates made for one test with the `openssl` command line: two CAs, and leaf
/// certificates (for 127.0.0.1 and localhost, server and client use) signed by either.
pub struct TestPki {
    pub dir: std::path::PathBuf,
}

impl TestPki {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "dimple-pki-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("leaf.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        Self { dir }
    }

    fn openssl(&self, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("these tests need the `openssl` command: {e}"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ]);
    }

    /// A leaf certificate `name` signed by `ca`, as this component's TLS settings (trusting
    /// `trust`).
    pub fn leaf(&self, name: &str, ca: &str, trust: &str) -> dimple_proto::tls::InternalTls {
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
            "-out",
            &format!("{name}.crt"),
        ]);
        let read = |f: String| std::fs::read(self.dir.join(f)).unwrap();
        dimple_proto::tls::InternalTls {
            cert_pem: read(format!("{name}.crt")),
            key_pem: read(format!("{name}.key")),
            ca_pem: read(format!("{trust}.crt")),
        }
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
