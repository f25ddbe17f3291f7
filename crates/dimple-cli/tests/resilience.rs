//! Failures must not spread: a request that kills engines is retried once, not on every
//! worker; retries stay within the router's budget; expired deadlines are reported as such
//! and never blamed on a worker; a frozen worker's requests are re-routed within about a
//! second; overload is refused early; router and workers authenticate each other with mutual
//! TLS. Real gRPC on 127.0.0.1, in-process workers (with injected engine faults) and real
//! worker processes.

mod cluster_support;

use std::time::Duration;

use cluster_support::*;
use dimple_engine::{FaultInjection, FaultKind};
use dimple_proto::telemetry::names;
use dimple_router::Discovery;
use dimple_router::retry::RetryBudgetConfig;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_of_death_is_retried_once_not_on_every_worker() {
    // Every engine dies at its first forward pass: whichever worker takes the request dies.
    let fault = FaultInjection {
        rank: 0,
        forward_pass: 0,
        kind: FaultKind::Error,
    };
    let workers: Vec<WorkerProc> = (0..4)
        .map(|_| WorkerProc::start_faulty(engine_config(), fault, None))
        .collect();
    let addrs = workers.iter().map(|w| w.addr.to_string()).collect();
    let router = RouterProc::start(router_config(Discovery::Static(addrs))).await;
    let mut client = router.client().await;
    let s = client.generate(small_request(8)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(
        s.message().contains("not retried further"),
        "{}",
        s.message()
    );
    let dead = workers
        .iter()
        .filter(|w| w.worker.engine_failure().is_some())
        .count();
    assert_eq!(dead, 2, "the request reached two workers, not all four");
    let m = router.metrics().await;
    let retries = metric(&m, names::ROUTER_RETRIES, "");
    println!("query of death: {retries} retry for 1 request, {dead} of 4 engines lost");
    assert_eq!(retries, 1.0);
    assert_eq!(
        metric(&m, names::ROUTER_RETRIES_DENIED, "reason=\"engine_failed\""),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_within_the_router_wide_budget() {
    // Workers whose queues take nothing: every attempt fails, and could be retried.
    let full = dimple_engine::EngineConfig {
        max_waiting: 0,
        ..engine_config()
    };
    let workers: Vec<WorkerProc> = (0..3)
        .map(|_| WorkerProc::start(full.clone(), None))
        .collect();
    let addrs = workers.iter().map(|w| w.addr.to_string()).collect();
    let mut cfg = router_config(Discovery::Static(addrs));
    cfg.retry_budget = RetryBudgetConfig {
        ratio: 0.1,
        floor: 2,
        window: Duration::from_secs(60),
    };
    let router = RouterProc::start(cfg).await;
    let mut client = router.client().await;
    for _ in 0..20 {
        let s = client.generate(small_request(4)).await.unwrap_err();
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    }
    let m = router.metrics().await;
    let retries = metric(&m, names::ROUTER_RETRIES, "");
    // 2 + 10% of 20 requests, where 2 retries per request would be 40.
    assert!(retries <= 4.0, "{retries} retries");
    assert!(metric(&m, names::ROUTER_RETRIES_DENIED, "reason=\"budget\"") >= 16.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deadlines_are_deadline_exceeded_and_no_workers_fault() {
    let (router, _workers) = cluster(2, engine_config()).await;
    let client = router.client().await;
    let mut calls = Vec::new();
    for i in 0..12u64 {
        let mut c = client.clone();
        calls.push(tokio::spawn(async move {
            let timeout = Duration::from_millis(400 + (i % 4) * 100);
            if i % 3 == 0 {
                let mut req = tonic::Request::new(small_request(1000));
                req.set_timeout(timeout);
                let mut stream = c.generate_stream(req).await?.into_inner();
                while stream.message().await?.is_some() {}
                Ok(())
            } else {
                let mut req = tonic::Request::new(small_request(1000));
                req.set_timeout(timeout);
                c.generate(req).await.map(|_| ())
            }
        }));
    }
    for c in calls {
        let s = c.await.unwrap().unwrap_err();
        assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    }
    let m = router.metrics().await;
    assert_eq!(metric(&m, names::ROUTER_RETRIES, ""), 0.0);
    for rpc in ["generate", "generate_stream"] {
        assert_eq!(
            metric(
                &m,
                names::ROUTER_REQUESTS,
                &format!("outcome=\"unavailable\",rpc=\"{rpc}\"")
            ),
            0.0
        );
    }
    assert!(
        router.pool.snapshot().iter().all(|e| e.is_healthy()),
        "no worker is blamed for an expired deadline"
    );
}

/// A `dimple worker` child process over the golden model; stopped and killed on drop.
struct WorkerChild {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl WorkerChild {
    async fn start() -> Self {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_dimple"))
            .args(["worker", "--listen", &addr.to_string()])
            .args(["--metrics-listen", "127.0.0.1:0", "--device", "cpu"])
            .arg("--model")
            .arg(golden(""))
            .env("DIMPLE_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("the dimple binary starts");
        let me = Self { child, addr };
        let t = std::time::Instant::now();
        while me.load().await.is_none() {
            assert!(t.elapsed() < Duration::from_secs(30), "the worker comes up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        me
    }

    /// The worker's load, if it answers within 200 ms.
    async fn load(&self) -> Option<dimple_proto::worker::LoadReport> {
        use dimple_proto::worker::{LoadRequest, worker_client::WorkerClient};
        let ask = async {
            let mut c = WorkerClient::connect(format!("http://{}", self.addr))
                .await
                .ok()?;
            c.load(LoadRequest {}).await.ok().map(|r| r.into_inner())
        };
        tokio::time::timeout(Duration::from_millis(200), ask)
            .await
            .ok()
            .flatten()
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for WorkerChild {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_process_has_its_requests_rerouted_within_seconds() {
    let workers = [WorkerChild::start().await, WorkerChild::start().await];
    let addrs = workers.iter().map(|w| w.addr.to_string()).collect();
    let router = RouterProc::start(router_config(Discovery::Static(addrs))).await;
    let mut client = router.client().await;
    let reference = client
        .generate(small_request(300))
        .await
        .unwrap()
        .into_inner();

    let call = tokio::spawn(async move { client.generate(small_request(300)).await });
    let t = std::time::Instant::now();
    let victim = loop {
        let mut busy = None;
        for (i, w) in workers.iter().enumerate() {
            if w.load().await.is_some_and(|l| l.active > 0) {
                busy = Some(i);
            }
        }
        if let Some(i) = busy {
            break i;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no worker took the request"
        );
    };
    workers[victim].signal("-STOP");
    let frozen = std::time::Instant::now();
    let survivor = &workers[1 - victim];
    let rerouted = loop {
        if survivor.load().await.is_some_and(|l| l.active > 0) {
            break frozen.elapsed();
        }
        assert!(
            frozen.elapsed() < Duration::from_secs(5),
            "the request was not re-routed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let answer = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("no hang")
        .unwrap()
        .expect("answered by the other worker")
        .into_inner();
    let answered = frozen.elapsed();
    println!(
        "frozen worker: request re-routed after {rerouted:?}, answered after {answered:?} \
         (poll every 200 ms, poll timeout 1 s)"
    );
    assert_eq!(answer.token_ids, reference.token_ids);
    assert!(rerouted < Duration::from_secs(3), "{rerouted:?}");
    assert_eq!(
        metric(&router.metrics().await, names::ROUTER_RETRIES, ""),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_step_turns_the_worker_not_serving_until_steps_finish_again() {
    use dimple_proto::worker;
    use dimple_worker::server::SERVICE_NAME;
    use tonic_health::pb::health_check_response::ServingStatus;

    let fault = FaultInjection {
        rank: 0,
        forward_pass: 2,
        kind: FaultKind::Hang { millis: 2000 },
    };
    let w = WorkerProc::start_faulty_watched(
        engine_config(),
        fault,
        None,
        Some(Duration::from_millis(300)),
    );
    let (serving, not_serving) = (
        ServingStatus::Serving as i32,
        ServingStatus::NotServing as i32,
    );
    let t = std::time::Instant::now();
    while health(w.addr, SERVICE_NAME).await != serving {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the worker turns ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = worker::worker_client::WorkerClient::connect(format!("http://{}", w.addr))
        .await
        .unwrap();
    let req = worker::GenerateRequest {
        request_id: "slow".into(),
        prompt_ids: vec![5, 6, 7],
        images: vec![],
        params: Some(worker::DecodeParams {
            max_new_tokens: 8,
            steps: 8,
            alg: "maskgit_plus".into(),
            pipeline: "dim".into(),
            use_original_confidence: true,
            ..Default::default()
        }),
    };
    let started = std::time::Instant::now();
    let call = tokio::spawn(async move {
        let mut stream = client.generate(req).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    });
    while health(w.addr, SERVICE_NAME).await != not_serving {
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "the stuck step went unnoticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let noticed = started.elapsed();
    assert!(!w.worker.load().accepting);
    assert_eq!(
        health(w.addr, "").await,
        serving,
        "the process itself is alive"
    );
    call.await
        .unwrap()
        .expect("the request ends normally once the step does");
    let t = std::time::Instant::now();
    while health(w.addr, SERVICE_NAME).await != serving {
        assert!(t.elapsed() < Duration::from_secs(1), "the worker recovers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("stuck step (2 s, watchdog 300 ms): NOT_SERVING after {noticed:?}");
    assert!(w.worker.load().accepting);
}

/// A direct worker request decoding `n` slots over a short text prompt.
fn worker_request(n: u32, images: Vec<Vec<u8>>) -> dimple_proto::worker::GenerateRequest {
    dimple_proto::worker::GenerateRequest {
        request_id: "direct".into(),
        prompt_ids: vec![5, 6, 7],
        images,
        params: Some(dimple_proto::worker::DecodeParams {
            max_new_tokens: n,
            steps: n,
            alg: "maskgit_plus".into(),
            pipeline: "dim".into(),
            use_original_confidence: true,
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_worker_refuses_before_decoding_images() {
    use dimple_proto::worker::worker_client::WorkerClient;
    let cfg = dimple_engine::EngineConfig {
        max_active: 1,
        max_waiting: 1,
        ..engine_config()
    };
    let w = WorkerProc::start(cfg, None);
    let mut client = WorkerClient::connect(format!("http://{}", w.addr))
        .await
        .unwrap();
    // One request decoding, one waiting: the queue is full.
    let mut running = Vec::new();
    for want_active in [1, 1] {
        running.push(
            client
                .generate(worker_request(1000, vec![]))
                .await
                .unwrap()
                .into_inner(),
        );
        let t = std::time::Instant::now();
        while w.worker.load().active < want_active {
            assert!(t.elapsed() < Duration::from_secs(5));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let t = std::time::Instant::now();
    while w.worker.load().waiting < 1 {
        assert!(t.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let image = std::fs::read(golden("image1.png")).unwrap();
    for _ in 0..4 {
        let s = client
            .generate(worker_request(8, vec![image.clone()]))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    }
    let decoded = metric(
        &w.metrics().await,
        &format!("{}_count", names::WORKER_PREPROCESS_DURATION),
        "",
    );
    assert_eq!(decoded, 0.0, "no image was decoded for a refused request");
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_refuses_beyond_max_pending_at_once() {
    let w = WorkerProc::start(engine_config(), None);
    let mut cfg = router_config(Discovery::Static(vec![w.addr.to_string()]));
    cfg.max_pending = 2;
    let router = RouterProc::start(cfg).await;
    let client = router.client().await;
    let long: Vec<_> = (0..2)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.generate(small_request(400)).await })
        })
        .collect();
    let t = std::time::Instant::now();
    while w.worker.load().outstanding < 2 {
        assert!(t.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..4 {
        let t = std::time::Instant::now();
        let s = client.clone().generate(small_request(4)).await.unwrap_err();
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        assert!(s.message().contains("max_pending"), "{}", s.message());
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
    }
    assert_eq!(
        w.worker.load().outstanding,
        2,
        "nothing more reached the worker"
    );
    for h in long {
        h.await
            .unwrap()
            .expect("the admitted requests are answered");
    }
    client
        .clone()
        .generate(small_request(4))
        .await
        .expect("places free up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_workers_authenticate_each_other_with_mutual_tls() {
    use dimple_proto::worker::{LoadRequest, worker_client::WorkerClient};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

    let pki = TestPki::new();
    pki.ca("cluster-ca");
    pki.ca("other-ca");
    let worker_tls = pki.leaf("worker", "cluster-ca", "cluster-ca");
    let router_tls = pki.leaf("router", "cluster-ca", "cluster-ca");
    let rogue_tls = pki.leaf("rogue", "other-ca", "cluster-ca");

    let worker = WorkerProc::start_tls(engine_config(), worker_tls.clone());
    let mut cfg = router_config(Discovery::Static(vec![worker.addr.to_string()]));
    cfg.internal_tls = Some(router_tls.clone());
    let router = RouterProc::start(cfg).await;
    let answer = router
        .client()
        .await
        .generate(small_request(4))
        .await
        .expect("served over mutual TLS")
        .into_inner();
    assert_eq!(answer.token_ids.len(), 4);

    // A client that checks the worker but has no certificate of its own is refused, and so
    // is a plaintext one.
    let no_cert = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&worker_tls.ca_pem))
        .domain_name("localhost");
    let anonymous = async {
        let ch = Endpoint::from_shared(format!("https://{}", worker.addr))
            .unwrap()
            .tls_config(no_cert)
            .unwrap()
            .connect()
            .await?;
        WorkerClient::new(ch)
            .load(LoadRequest {})
            .await
            .map_err(|s| Box::new(s) as Box<dyn std::error::Error>)?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    assert!(
        anonymous.await.is_err(),
        "a client without a certificate got in"
    );
    let plain = async {
        let mut c = WorkerClient::connect(format!("http://{}", worker.addr)).await?;
        c.load(LoadRequest {})
            .await
            .map_err(|s| Box::new(s) as Box<dyn std::error::Error>)?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    assert!(plain.await.is_err(), "a plaintext client got in");

    // A worker whose certificate comes from another CA is not trusted by the router.
    let rogue = WorkerProc::start_tls(engine_config(), rogue_tls);
    let mut cfg = router_config(Discovery::Static(vec![rogue.addr.to_string()]));
    cfg.internal_tls = Some(router_tls);
    let router = RouterProc::start(cfg).await;
    let s = router
        .client()
        .await
        .generate(small_request(4))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert_eq!(rogue.worker.load().outstanding, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_rotate_without_a_restart_and_refusals_are_counted() {
    let w = WorkerProc::start(engine_config(), None);
    let path = std::env::temp_dir().join(format!("dimple-api-keys-{}", std::process::id()));
    std::fs::write(&path, "old-key\n").unwrap();
    let mut cfg = router_config(Discovery::Static(vec![w.addr.to_string()]));
    cfg.api_keys = dimple_router::ApiKeys::from_file(&path).unwrap();
    cfg.api_keys_poll = Duration::from_millis(50);
    let router = RouterProc::start(cfg).await;
    let mut client = router.client().await;
    let mut call = async |key: &str| {
        let mut req = tonic::Request::new(small_request(4));
        req.metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        client.generate(req).await.map(|_| ())
    };
    let mut refused = 0.0;
    call("old-key").await.expect("the configured key works");
    assert_eq!(
        call("new-key").await.unwrap_err().code(),
        Code::Unauthenticated
    );
    refused += 1.0;

    std::fs::write(&path, "new-key\n").unwrap();
    let t = std::time::Instant::now();
    loop {
        match call("old-key").await {
            Ok(()) => assert!(
                t.elapsed() < Duration::from_secs(3),
                "the old key still works"
            ),
            Err(s) => {
                assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
                refused += 1.0;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    call("new-key")
        .await
        .expect("the rotated key works without a restart");
    let m = router.metrics().await;
    assert_eq!(
        metric(
            &m,
            names::ROUTER_REQUESTS,
            "outcome=\"unauthenticated\",rpc=\"generate\""
        ),
        refused
    );
    let _ = std::fs::remove_file(&path);
}
