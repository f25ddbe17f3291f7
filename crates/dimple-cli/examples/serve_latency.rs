//! Batch-1 latency of `dimple serve`'s two shapes over one engine: the front-end with the
//! in-process backend (what `serve` runs), and the front-end reaching the same worker over
//! loopback gRPC (what it ran before, and what a router does). Requests alternate between
//! the two, one at a time, so both see the same machine load.
//!
//! `cargo run -p dimple-cli --example serve_latency -- [ROUNDS]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use dimple_engine::EngineConfig;
use dimple_model::preprocess::PreprocessConfig;
use dimple_proto::v1;
use dimple_proto::v1::dimple_client::DimpleClient;
use dimple_router::prompt::PromptBuilder;
use dimple_router::{Discovery, Router, RouterConfig};
use dimple_worker::{LocalBackend, ServeOptions, Worker};
use prometheus::Registry;
use tokio::net::TcpListener;

fn request(threshold: Option<f32>) -> v1::GenerateRequest {
    v1::GenerateRequest {
        input: Some(v1::generate_request::Input::Chat(v1::Chat {
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: vec![v1::ContentPart {
                    part: Some(v1::content_part::Part::Text("What is 3 plus 4?".into())),
                }],
            }],
        })),
        params: Some(v1::DecodeParams {
            threshold,
            use_cache: Some(threshold.is_some()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn grpc_router(router: Router) -> DimpleClient<tonic::transport::Channel> {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(dimple_router::serve(l, router, std::future::pending()));
    DimpleClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mean = v.iter().map(|&d| ms(d)).sum::<f64>() / v.len() as f64;
    println!(
        "{name:<34} n={:<4} mean {:>7.2} ms  p50 {:>7.2} ms  p90 {:>7.2} ms",
        v.len(),
        mean,
        ms(v[v.len() / 2]),
        ms(v[v.len() * 9 / 10])
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100);
    let registry = Registry::new();
    let pre = PreprocessConfig::from_json(dimple_core::builtin::PREPROCESSOR_CONFIG_JSON).unwrap();
    let images = dimple_worker::image_limits(&pre);
    let worker = Worker::builtin(EngineConfig::default(), &registry).unwrap();

    let wl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let worker_addr = wl.local_addr().unwrap();
    tokio::spawn(dimple_worker::serve(
        wl,
        worker.clone(),
        ServeOptions {
            advertise_addr: worker_addr.to_string(),
            ..ServeOptions::default()
        },
        std::future::pending(),
    ));
    let cfg = RouterConfig {
        images,
        ..RouterConfig::default()
    };
    let hop = Router::new(
        PromptBuilder::builtin().unwrap(),
        RouterConfig {
            discovery: Discovery::Static(vec![worker_addr.to_string()]),
            ..cfg.clone()
        },
        &Registry::new(),
    )
    .unwrap();
    let local = Router::with_backend(
        PromptBuilder::builtin().unwrap(),
        cfg,
        Arc::new(LocalBackend::new(worker.clone())),
        &Registry::new(),
    )
    .unwrap();
    let mut hop = grpc_router(hop).await;
    let mut local = grpc_router(local).await;

    for (label, threshold) in [("schedule", None), ("threshold 0.9 + cache", Some(0.9))] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 0..rounds + 5 {
            for (client, out) in [(&mut local, &mut a), (&mut hop, &mut b)] {
                let t = Instant::now();
                let r = client
                    .generate(request(threshold))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(r.text, "7");
                // The first rounds warm connections and caches.
                if i >= 5 {
                    out.push(t.elapsed());
                }
            }
        }
        println!("-- {label}");
        summary("in-process backend (serve now)", a);
        summary("loopback gRPC to the worker (before)", b);
    }
}
