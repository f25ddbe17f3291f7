//! The serving layer end to end on 127.0.0.1: a router in front of workers running the
//! golden tiny model, spoken to over real gRPC sockets. Golden histories through both RPCs,
//! bad input, queue overflow, cancellation, killed workers, TLS and API keys, draining, and a
//! bounded load test.

mod cluster_support;

use std::time::{Duration, Instant};

use cluster_support::*;
use dimple_engine::EngineConfig;
use dimple_proto::telemetry::names;
use dimple_proto::v1;
use dimple_router::{ApiKeys, Discovery, TlsIdentity};
use tonic::Code;

const STEP_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_histories_through_generate_and_generate_stream() {
    let (router, workers) = cluster(2, engine_config()).await;
    let cases = golden_cases();
    let mut streams = Vec::new();
    for case in &cases {
        let mut client = router.client().await;
        let req = case.request.clone();
        streams.push(tokio::spawn(
            async move { stream_all(&mut client, req).await },
        ));
    }
    for (case, handle) in cases.iter().zip(streams) {
        let got = handle
            .await
            .unwrap()
            .unwrap_or_else(|s| panic!("{}: {s:?}", case.name));
        assert_eq!(
            got.started.initial_ids, case.initial,
            "{}: initial row",
            case.name
        );
        assert_eq!(got.started.mask_token_id, GOLDEN_MASK_ID);
        assert_eq!(
            got.history.len(),
            case.history.len(),
            "{}: number of steps",
            case.name
        );
        for (s, (a, b)) in got.history.iter().zip(&case.history).enumerate() {
            assert_eq!(a, b, "{}: response after step {s}", case.name);
        }
        // The streamed steps add up to the final answer.
        assert_eq!(
            got.history.last(),
            Some(&got.last.token_ids),
            "{}",
            case.name
        );
        assert_eq!(
            got.last.steps as usize, case.steps_taken,
            "{}: steps taken",
            case.name
        );
        let last = got.updates.last().unwrap();
        let masks = got
            .last
            .token_ids
            .iter()
            .filter(|&&t| t == GOLDEN_MASK_ID)
            .count();
        assert_eq!(last.masks_left as usize, masks, "{}", case.name);
        assert!(
            last.canvas.as_ref().unwrap().matches('_').count() >= masks,
            "{}",
            case.name
        );
        if masks == 0 {
            assert_eq!(
                last.prefix_text, got.last.text,
                "{}: the final prefix is the answer",
                case.name
            );
        }
    }
    let mut unary = Vec::new();
    for case in &cases {
        let mut client = router.client().await;
        let req = case.request.clone();
        unary.push(tokio::spawn(async move { client.generate(req).await }));
    }
    for (case, handle) in cases.iter().zip(unary) {
        let resp = handle
            .await
            .unwrap()
            .unwrap_or_else(|s| panic!("{}: {s:?}", case.name))
            .into_inner();
        assert_eq!(
            Some(&resp.token_ids),
            case.history.last(),
            "{}: final tokens",
            case.name
        );
        assert_eq!(
            resp.steps as usize, case.steps_taken,
            "{}: steps",
            case.name
        );
        assert_eq!(resp.request_id, case.name);
    }
    // Least outstanding work spread the concurrent requests over both workers.
    for w in &workers {
        let served = metric(&w.metrics().await, names::WORKER_REQUESTS, "outcome=\"ok\"");
        assert!(served > 0.0, "worker {} served nothing", w.addr);
    }
    let m = router.metrics().await;
    let total = 2.0 * cases.len() as f64;
    let ok = metric(
        &m,
        names::ROUTER_REQUESTS,
        "outcome=\"ok\",rpc=\"generate\"",
    ) + metric(
        &m,
        names::ROUTER_REQUESTS,
        "outcome=\"ok\",rpc=\"generate_stream\"",
    );
    assert_eq!(ok, total);
    assert_eq!(
        metric(&m, &format!("{}_count", names::ROUTER_REQUEST_STEPS), ""),
        total
    );
}

/// A PNG whose header claims `w` x `h` pixels, with nothing behind it.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    // IHDR, then an empty IDAT so that a header reader finds where the pixels would start.
    for (len, chunk) in [(13u32, ihdr), (0, b"IDAT".to_vec()), (0, b"IEND".to_vec())] {
        png.extend_from_slice(&len.to_be_bytes());
        png.extend_from_slice(&chunk);
        png.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    png
}

fn chat_with_image(data: Vec<u8>) -> v1::GenerateRequest {
    v1::GenerateRequest {
        input: Some(v1::generate_request::Input::Chat(v1::Chat {
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: vec![
                    v1::ContentPart {
                        part: Some(v1::content_part::Part::Image(v1::Image { data })),
                    },
                    v1::ContentPart {
                        part: Some(v1::content_part::Part::Text("what is it?".into())),
                    },
                ],
            }],
        })),
        params: Some(v1::DecodeParams {
            max_new_tokens: Some(8),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_with_the_field_and_the_limit() {
    let (router, _workers) = cluster(2, engine_config()).await;
    let mut client = router.client().await;
    let with = |f: &dyn Fn(&mut v1::GenerateRequest)| {
        let mut r = small_request(8);
        f(&mut r);
        r
    };
    let mut truncated = std::fs::read(golden("image1.png")).unwrap();
    truncated.truncate(60);
    let long_prompt = with(&|r| {
        r.input = Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
            ids: vec![5; 300],
            images: vec![],
        }))
    });
    let cases: Vec<(&str, v1::GenerateRequest, &str)> = vec![
        (
            "undecodable image",
            chat_with_image(b"definitely not an image".to_vec()),
            "`chat.messages[0].content[0].image`",
        ),
        // The header reads (so the router counts its tokens) but the pixels do not decode:
        // the worker refuses it, and the router does not retry elsewhere.
        ("truncated image", chat_with_image(truncated), "`images[0]`"),
        (
            "image bomb",
            chat_with_image(png_header(100_000, 100_000)),
            "above the limit of 50000000 (`max_image_pixels`)",
        ),
        (
            "threshold 1.5",
            with(&|r| r.params.as_mut().unwrap().threshold = Some(1.5)),
            "`threshold` must be in [0, 1), got 1.5",
        ),
        (
            "max_new_tokens 0",
            with(&|r| r.params.as_mut().unwrap().max_new_tokens = Some(0)),
            "`max_new_tokens` must be in [1, 1024], got 0",
        ),
        (
            "max_new_tokens above the limit",
            with(&|r| r.params.as_mut().unwrap().max_new_tokens = Some(5000)),
            "`max_new_tokens` must be in [1, 1024], got 5000",
        ),
        (
            "prompt too long",
            long_prompt,
            "the prompt has 300 tokens, more than `max_prompt_tokens` = 256",
        ),
        (
            "unknown algorithm",
            with(&|r| r.params.as_mut().unwrap().alg = "maskgit".into()),
            "`params.alg`: unknown `alg` \"maskgit\"",
        ),
        (
            "prior out of range",
            with(&|r| {
                r.prior = Some(v1::StructurePrior {
                    prior: Some(v1::structure_prior::Prior::Fixed(v1::FixedTokens {
                        tokens: vec![v1::FixedToken {
                            position: 8,
                            token_id: 5,
                        }],
                    })),
                })
            }),
            "`prior` position 8 must be < `max_new_tokens` (8)",
        ),
        (
            "empty prompt",
            with(&|r| r.input = Some(v1::generate_request::Input::Text(String::new()))),
            "`text` must not be empty",
        ),
        (
            "empty token ids",
            with(&|r| {
                r.input = Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                    ids: vec![],
                    images: vec![],
                }))
            }),
            "`token_ids.ids` must not be empty",
        ),
        (
            "token outside the vocabulary",
            with(&|r| {
                r.input = Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                    ids: vec![1, 999],
                    images: vec![],
                }))
            }),
            "`token_ids.ids[1]` = 999 is outside the vocabulary (size 384)",
        ),
        (
            "no input",
            v1::GenerateRequest::default(),
            "`input` must be set",
        ),
    ];
    for (what, req, needle) in cases {
        for streaming in [false, true] {
            let status = if streaming {
                stream_all(&mut client, req.clone()).await.err()
            } else {
                client.generate(req.clone()).await.err()
            };
            let status = status.unwrap_or_else(|| panic!("{what}: accepted"));
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
            assert!(
                status.message().contains(needle),
                "{what}: {:?} lacks {needle:?}",
                status.message()
            );
        }
    }
    let m = router.metrics().await;
    assert_eq!(
        metric(&m, names::ROUTER_RETRIES, ""),
        0.0,
        "invalid requests are never retried"
    );
    assert_eq!(
        metric(
            &m,
            names::ROUTER_REQUESTS,
            "outcome=\"invalid_argument\",rpc=\"generate\""
        ),
        13.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queues_answer_resource_exhausted() {
    let cfg = EngineConfig {
        max_active: 1,
        max_waiting: 1,
        ..engine_config()
    };
    let (router, _workers) = cluster(2, cfg).await;
    let mut handles = Vec::new();
    for _ in 0..16 {
        let mut client = router.client().await;
        handles.push(tokio::spawn(async move {
            client.generate(small_request(256)).await
        }));
    }
    let (mut ok, mut full) = (0, 0);
    for h in handles {
        match h.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("queue is full"), "{}", s.message());
                full += 1;
            }
        }
    }
    assert!(ok >= 2 && full >= 1, "{ok} answered, {full} refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_frees_the_workers_cache() {
    let (router, workers) = cluster(1, engine_config()).await;
    let w = &workers[0];
    let mut client = router.client().await;
    let mut req = small_request(1000);
    req.params.as_mut().unwrap().use_cache = Some(true);
    let mut stream = client.generate_stream(req).await.unwrap().into_inner();
    for _ in 0..3 {
        tokio::time::timeout(STEP_TIMEOUT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    let m = w.metrics().await;
    assert!(
        metric(&m, names::ENGINE_CACHE_USED, "") > 0.0,
        "the running request holds prompt cache"
    );
    assert_eq!(metric(&m, names::ENGINE_ACTIVE, ""), 1.0);
    drop(stream);
    let t = Instant::now();
    loop {
        let m = w.metrics().await;
        if metric(&m, names::ENGINE_CACHE_USED, "") == 0.0
            && metric(&m, names::ENGINE_ACTIVE, "") == 0.0
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "cache not freed after the client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It was cancelled, not finished: far fewer than 1000 forward passes ran, and no more run.
    let passes = metric(&w.metrics().await, names::ENGINE_FORWARD_PASSES, "");
    assert!(passes < 500.0, "{passes} forward passes");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = w.metrics().await;
    assert_eq!(metric(&m, names::ENGINE_FORWARD_PASSES, ""), passes);
    assert_eq!(
        metric(&m, names::WORKER_REQUESTS, "outcome=\"cancelled\""),
        1.0
    );
    assert_eq!(metric(&m, names::WORKER_OUTSTANDING, ""), 0.0);
}

/// The worker of `workers` that is running a request.
async fn busy(workers: &[WorkerProc]) -> usize {
    let t = Instant::now();
    loop {
        if let Some(i) = workers.iter().position(|w| w.worker.load().active > 0) {
            return i;
        }
        assert!(
            t.elapsed() < STEP_TIMEOUT,
            "no worker picked the request up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_workers_never_hang_a_client() {
    let (router, mut workers) = cluster(2, engine_config()).await;
    let mut client = router.client().await;
    let reference = client
        .generate(small_request(400))
        .await
        .unwrap()
        .into_inner();

    // Streaming: steps already reached the client, so the answer is UNAVAILABLE, at once.
    let mut stream = client
        .generate_stream(small_request(400))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        tokio::time::timeout(STEP_TIMEOUT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    let victim = busy(&workers).await;
    workers[victim].kill();
    let t = Instant::now();
    let status = loop {
        match tokio::time::timeout(STEP_TIMEOUT, stream.message())
            .await
            .expect("no hang")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an answer"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("failed after streaming began"),
        "{}",
        status.message()
    );
    assert!(t.elapsed() < Duration::from_secs(5));

    // Unary: nothing reached the client yet, so the router retries on the other worker
    // and the answer is the same as on a healthy cluster.
    let survivor = 1 - victim;
    let (router2, mut workers2) = cluster(2, engine_config()).await;
    let mut client2 = router2.client().await;
    let call = tokio::spawn(async move { client2.generate(small_request(400)).await });
    let victim2 = busy(&workers2).await;
    workers2[victim2].kill();
    let answer = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("no hang")
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(answer.token_ids, reference.token_ids);
    assert!(metric(&router2.metrics().await, names::ROUTER_RETRIES, "") >= 1.0);

    // The dead worker stays listed (static list) but requests keep being answered.
    for _ in 0..4 {
        client.generate(small_request(4)).await.unwrap();
    }
    assert!(workers[survivor].worker.load().accepting);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_workers_is_unavailable_at_once() {
    let router = RouterProc::start(router_config(Discovery::Static(vec![]))).await;
    let mut client = router.client().await;
    for streaming in [false, true] {
        let t = Instant::now();
        let s = if streaming {
            stream_all(&mut client, small_request(4)).await.unwrap_err()
        } else {
            client.generate(small_request(4)).await.unwrap_err()
        };
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert_eq!(s.message(), "no workers are available");
        assert!(t.elapsed() < Duration::from_millis(500));
    }
    let s = client
        .get_model_info(v1::GetModelInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_api_keys_health_and_graceful_drain() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

    let worker = WorkerProc::start(engine_config(), None);
    let mut cfg = router_config(Discovery::Static(vec![worker.addr.to_string()]));
    cfg.tls = Some(TlsIdentity {
        cert_pem: std::fs::read(fixture("tls/server.crt")).unwrap(),
        key_pem: std::fs::read(fixture("tls/server.key")).unwrap(),
    });
    cfg.api_keys = ApiKeys::parse("secret-1\nsecret-2\n");
    let mut router = RouterProc::start(cfg).await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(fixture("tls/ca.crt")).unwrap(),
        ))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{}", router.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS handshake");
    let mut client = v1::dimple_client::DimpleClient::new(channel.clone());
    let authed = |key: &str, r: v1::GenerateRequest| {
        let mut req = tonic::Request::new(r);
        req.metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        req
    };
    let s = client.generate(small_request(4)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let s = client
        .generate(authed("wrong", small_request(4)))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let ok = client
        .generate(authed("secret-2", small_request(4)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.token_ids.len(), 4);
    // Plain-text clients cannot talk to a TLS router.
    let plain =
        match v1::dimple_client::DimpleClient::connect(format!("http://{}", router.addr)).await {
            Err(_) => true,
            Ok(mut c) => c
                .generate(authed("secret-1", small_request(4)))
                .await
                .is_err(),
        };
    assert!(plain);

    // Health needs no key; readiness turns NOT_SERVING when draining, while a running stream
    // ends normally.
    let mut health = HealthClient::new(channel);
    let check = health
        .check(HealthCheckRequest {
            service: "dimple.v1.Dimple".into(),
        })
        .await
        .unwrap();
    assert_eq!(check.into_inner().status(), ServingStatus::Serving);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "dimple.v1.Dimple".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    let mut stream = client
        .generate_stream(authed("secret-1", small_request(300)))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    router.begin_shutdown();
    let next = tokio::time::timeout(STEP_TIMEOUT, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    let mut last = None;
    while let Some(msg) = tokio::time::timeout(STEP_TIMEOUT, stream.message())
        .await
        .unwrap()
        .unwrap()
    {
        last = msg.event;
    }
    assert!(
        matches!(last, Some(v1::generate_stream_response::Event::Final(f)) if f.token_ids.len() == 300)
    );
    router.stopped().await;
}

/// One health check on a fresh connection (as a probe makes it); the status as a number.
async fn health_status(addr: std::net::SocketAddr, service: &str) -> i32 {
    health(addr, service).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_load_every_good_request_answered_every_bad_one_rejected() {
    const TOTAL: usize = 500;
    const CONCURRENCY: usize = 32;
    let (router, workers) = cluster(2, engine_config()).await;
    let t = Instant::now();
    while health_status(router.addr, "dimple.v1.Dimple").await != 1
        || health_status(workers[0].addr, "dimple.worker.v1.Worker").await != 1
    {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the cluster turns ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While the load runs: health checks (router readiness, a worker's readiness) and a small
    // request on their own connections, every 100 ms.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let done = done.clone();
        let (router_addr, worker_addr) = (router.addr, workers[0].addr);
        let mut small = router.client().await;
        tokio::spawn(async move {
            let (mut health, mut answers) = (Vec::new(), Vec::new());
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                for (addr, service) in [
                    (router_addr, "dimple.v1.Dimple"),
                    (worker_addr, "dimple.worker.v1.Worker"),
                ] {
                    let t = Instant::now();
                    assert_eq!(health_status(addr, service).await, 1, "{service} ready");
                    health.push(t.elapsed());
                }
                let t = Instant::now();
                small.generate(small_request(1)).await.unwrap();
                answers.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (health, answers)
        })
    };
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(TOTAL);
    let clients: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(router.client().await);
        }
        v
    };
    for i in 0..TOTAL {
        let bad = i % 10 == 7;
        let mut req = small_request(8);
        if bad {
            req.params.as_mut().unwrap().threshold = Some(1.5);
        }
        let mut client = clients[i % clients.len()].clone();
        let permit = sem.clone().acquire_owned().await.unwrap();
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = client.generate(req).await;
            drop(permit);
            (bad, r.map(|r| r.into_inner()), t.elapsed())
        }));
    }
    let mut latencies = Vec::new();
    let (mut good_ok, mut bad_rejected) = (0, 0);
    for h in handles {
        let (bad, r, took) = h.await.unwrap();
        match (bad, r) {
            (false, Ok(resp)) => {
                assert_eq!(resp.token_ids.len(), 8);
                good_ok += 1;
                latencies.push(took);
            }
            (true, Err(s)) if s.code() == Code::InvalidArgument => bad_rejected += 1,
            (bad, other) => panic!("bad={bad}: {other:?}"),
        }
    }
    let wall = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Release);
    let (mut health, mut answers) = probe.await.unwrap();
    assert!(!answers.is_empty());
    health.sort();
    answers.sort();
    println!(
        "during the load: {} health checks, max {:?}; {} one-slot requests, median {:?}, max {:?}",
        health.len(),
        health.last().unwrap(),
        answers.len(),
        answers[answers.len() / 2],
        answers.last().unwrap()
    );
    assert!(*health.last().unwrap() < Duration::from_millis(500));
    assert!(answers[answers.len() / 2] < Duration::from_millis(500));
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "load test: {TOTAL} requests ({good_ok} good answered, {bad_rejected} bad rejected), concurrency {CONCURRENCY}, \
         2 workers: {:.1} s, {:.0} req/s, good p50 {:?}, p99 {:?}",
        wall.as_secs_f64(),
        TOTAL as f64 / wall.as_secs_f64(),
        pct(0.50),
        pct(0.99)
    );
    assert_eq!(good_ok, TOTAL - TOTAL / 10);
    assert_eq!(bad_rejected, TOTAL / 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_reach_the_worker() {
    use dimple_proto::worker;
    let (router, workers) = cluster(1, engine_config()).await;
    // The worker honours `grpc-timeout`: the engine ends the request at its deadline.
    let mut direct =
        worker::worker_client::WorkerClient::connect(format!("http://{}", workers[0].addr))
            .await
            .unwrap();
    let mut req = tonic::Request::new(worker::GenerateRequest {
        request_id: "direct".into(),
        prompt_ids: vec![5, 6, 7],
        images: vec![],
        params: Some(worker::DecodeParams {
            max_new_tokens: 1000,
            steps: 1000,
            alg: "maskgit_plus".into(),
            pipeline: "dim".into(),
            use_original_confidence: true,
            ..Default::default()
        }),
    });
    req.set_timeout(Duration::from_millis(300));
    let t = Instant::now();
    let mut stream = direct.generate(req).await.unwrap().into_inner();
    let finished = loop {
        match stream.message().await.unwrap().expect("a final event") {
            worker::GenerateEvent {
                event: Some(worker::generate_event::Event::Finished(f)),
            } => break f,
            _ => continue,
        }
    };
    assert_eq!(finished.finish_reason, "deadline_exceeded");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // Through the router: its deadline (here its request timeout cap; a client's
    // `grpc-timeout` takes the same path) reaches the worker, which stops the request.
    let mut cfg = router_config(Discovery::Static(vec![workers[0].addr.to_string()]));
    cfg.request_timeout = Duration::from_millis(300);
    let capped = RouterProc::start(cfg).await;
    let mut client = capped.client().await;
    let t = Instant::now();
    let s = client.generate(small_request(1000)).await.unwrap_err();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    assert!(t.elapsed() < Duration::from_secs(2));
    wait_idle(&workers[0]).await;
    let m = workers[0].metrics().await;
    assert_eq!(
        metric(&m, names::WORKER_REQUESTS, "outcome=\"deadline_exceeded\"")
            + metric(&m, names::WORKER_REQUESTS, "outcome=\"cancelled\""),
        2.0,
        "both expired requests ended early on the worker"
    );

    // A client's own deadline: the client gives up (tonic reports its own timer as
    // CANCELLED), the router drops the worker call, and the worker is freed.
    let mut client = router.client().await;
    let mut req = tonic::Request::new(small_request(1000));
    req.set_timeout(Duration::from_millis(300));
    let s = client.generate(req).await.unwrap_err();
    assert!(
        matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{s:?}"
    );
    wait_idle(&workers[0]).await;
    assert!(
        metric(
            &workers[0].metrics().await,
            names::ENGINE_FORWARD_PASSES,
            ""
        ) < 2000.0
    );
}

async fn wait_idle(w: &WorkerProc) {
    let t = Instant::now();
    while w.worker.load().outstanding > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the worker still runs an expired request"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_info_tokenize_and_template_priors() {
    let (router, _workers) = cluster(2, engine_config()).await;
    let mut client = router.client().await;
    // The golden model's config.json.
    let info = client
        .get_model_info(v1::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.vocab_size, info.mask_token_id, info.eos_token_id),
        (384, 301, 307)
    );
    assert_eq!(
        (info.image_token_id, info.max_position_embeddings),
        (302, 2048)
    );
    assert_eq!(info.workers, 2);
    assert_eq!(info.limits.unwrap().max_prompt_tokens, 256);

    let builder = dimple_router::prompt::PromptBuilder::builtin().unwrap();
    let text = "ab c";
    let tok = client
        .tokenize(v1::TokenizeRequest {
            input: Some(v1::tokenize_request::Input::Text(text.into())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tok.ids, builder.encode_text(text).unwrap());
    assert_eq!(tok.tokens.concat(), text);

    // "ab<mask><mask>c": the pieces become fixed tokens around two free slots.
    let mut req = small_request(8);
    req.prior = Some(v1::StructurePrior {
        prior: Some(v1::structure_prior::Prior::Template(v1::TemplatePrior {
            template: "ab<mask><mask>c".into(),
            mask_placeholder: String::new(),
        })),
    });
    let got = stream_all(&mut client, req).await.unwrap();
    let ab = builder.encode_text("ab").unwrap();
    let c = builder.encode_text("c").unwrap();
    let mut want = vec![GOLDEN_MASK_ID; 8];
    want[..ab.len()].copy_from_slice(&ab);
    want[ab.len() + 2..ab.len() + 2 + c.len()].copy_from_slice(&c);
    assert_eq!(got.started.initial_ids, want);
    let fixed: Vec<usize> = (0..8).filter(|&i| want[i] != GOLDEN_MASK_ID).collect();
    for &i in &fixed {
        assert_eq!(got.last.token_ids[i], want[i], "fixed slot {i} kept");
    }
    for u in &got.updates {
        assert!(
            u.committed
                .iter()
                .all(|c| !fixed.contains(&(c.position as usize))),
            "fixed slots never commit"
        );
    }
}
