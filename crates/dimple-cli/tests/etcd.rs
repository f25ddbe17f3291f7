//! Discovery through a real etcd: workers that start are used, workers that stop (or die and
//! let their lease expire) are dropped, and a router keeps routing when etcd goes away.
//!
//! `DIMPLE_TEST_ETCD` must name a running etcd (`.ci/run` starts one on 127.0.0.1:2379);
//! these tests fail, never skip, without it. The etcd-going-away test starts its own etcd
//! (binary from `DIMPLE_TEST_ETCD_BIN`, default `etcd` in PATH) so that it can kill it; so does
//! the TLS test, whose etcd serves certificates made in the test (needs `openssl`) and has
//! authentication on.

mod cluster_support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cluster_support::*;
use dimple_proto::discovery::WorkerRecord;
use dimple_router::Discovery;
use dimple_worker::EtcdConfig;
use tonic::Code;

fn unique_prefix(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("/dimple-test/{test}-{}-{nanos}/", std::process::id())
}

/// The shared test etcd, checked to answer.
async fn test_etcd() -> String {
    let endpoint = std::env::var("DIMPLE_TEST_ETCD").unwrap_or_else(|_| {
        panic!(
            "DIMPLE_TEST_ETCD is not set: these tests need a running etcd, e.g. \
             `etcd --data-dir $(mktemp -d) --listen-client-urls http://127.0.0.1:2379 \
             --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 &` \
             and DIMPLE_TEST_ETCD=http://127.0.0.1:2379"
        )
    });
    if let Err(e) = reachable(&endpoint, Duration::from_secs(5)).await {
        panic!("DIMPLE_TEST_ETCD={endpoint} does not answer: {e}");
    }
    endpoint
}

async fn reachable(endpoint: &str, within: Duration) -> Result<(), String> {
    let t = Instant::now();
    loop {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_secs(1));
        let r = async {
            let mut c = etcd_client::Client::connect([endpoint], Some(opts)).await?;
            c.get("/dimple-test/ping", None).await
        }
        .await;
        match r {
            Ok(_) => return Ok(()),
            Err(e) if t.elapsed() > within => return Err(e.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn etcd_cfg(endpoint: &str, prefix: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![endpoint.to_owned()],
        prefix: prefix.to_owned(),
        lease_ttl: Duration::from_secs(2),
        security: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_start_are_used_and_workers_that_stop_are_dropped() {
    let endpoint = test_etcd().await;
    let prefix = unique_prefix("discovery");
    let router = RouterProc::start(router_config(Discovery::Etcd {
        endpoints: vec![endpoint.clone()],
        prefix: prefix.clone(),
        security: Default::default(),
    }))
    .await;
    let mut client = router.client().await;
    assert_eq!(
        client.generate(small_request(4)).await.unwrap_err().code(),
        Code::Unavailable
    );

    let mut w1 = WorkerProc::start(engine_config(), Some(etcd_cfg(&endpoint, &prefix)));
    router
        .wait_for_workers(&[w1.addr], Duration::from_secs(5))
        .await;
    client
        .generate(small_request(4))
        .await
        .expect("the registered worker serves");

    // The registration is the documented JSON record under `<prefix><address>`.
    let mut etcd = etcd_client::Client::connect([endpoint.as_str()], None)
        .await
        .unwrap();
    let got = etcd
        .get(format!("{prefix}{}", w1.addr), None)
        .await
        .unwrap();
    let record = WorkerRecord::from_json(got.kvs()[0].value()).unwrap();
    assert_eq!(record.addr, w1.addr.to_string());
    assert_eq!(record.capacity.max_waiting, engine_config().max_waiting);
    assert!(got.kvs()[0].lease() != 0, "the key lives under a lease");

    let mut w2 = WorkerProc::start(engine_config(), Some(etcd_cfg(&endpoint, &prefix)));
    router
        .wait_for_workers(&[w1.addr, w2.addr], Duration::from_secs(5))
        .await;

    // A graceful stop revokes the lease: dropped at once.
    let t = Instant::now();
    w1.stop().await;
    router
        .wait_for_workers(&[w2.addr], Duration::from_secs(2))
        .await;
    println!("stopped worker dropped after {:?}", t.elapsed());
    client
        .generate(small_request(4))
        .await
        .expect("the remaining worker serves");

    // A killed worker cannot deregister: dropped when its 2 s lease expires.
    let t = Instant::now();
    w2.kill();
    router.wait_for_workers(&[], Duration::from_secs(8)).await;
    println!(
        "killed worker dropped after {:?} (lease TTL 2 s)",
        t.elapsed()
    );
    assert_eq!(
        client.generate(small_request(4)).await.unwrap_err().code(),
        Code::Unavailable
    );
    assert!(
        etcd.get(
            prefix.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix())
        )
        .await
        .unwrap()
        .kvs()
        .is_empty()
    );
}

/// An etcd process this test owns; killed on drop.
struct OwnEtcd {
    child: Child,
    endpoint: String,
    dir: std::path::PathBuf,
}

impl OwnEtcd {
    fn start() -> Self {
        Self::start_with("http", &[])
    }

    /// An etcd serving TLS with the certificate `etcd` of `pki` and requiring client
    /// certificates from `etcd-ca`.
    fn start_tls(pki: &TestPki) -> Self {
        let file = |f: &str| pki.dir.join(f).to_string_lossy().into_owned();
        Self::start_with(
            "https",
            &[
                "--cert-file".into(),
                file("etcd.crt"),
                "--key-file".into(),
                file("etcd.key"),
                "--trusted-ca-file".into(),
                file("etcd-ca.crt"),
                "--client-cert-auth".into(),
            ],
        )
    }

    fn start_with(scheme: &str, extra: &[String]) -> Self {
        let bin = std::env::var("DIMPLE_TEST_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (client, peer) = (port(), port());
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let dir = std::env::temp_dir().join(unique_prefix("etcd").replace('/', "_"));
        let child = Command::new(&bin)
            .args(["--data-dir", &dir.to_string_lossy()])
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start etcd `{bin}` (set DIMPLE_TEST_ETCD_BIN): {e}")
            });
        Self {
            child,
            endpoint,
            dir,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnEtcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_still_routed_when_etcd_goes_away() {
    let mut etcd = OwnEtcd::start();
    reachable(&etcd.endpoint, Duration::from_secs(15))
        .await
        .expect("own etcd starts");
    let prefix = unique_prefix("outage");
    let worker = WorkerProc::start(engine_config(), Some(etcd_cfg(&etcd.endpoint, &prefix)));
    let router = RouterProc::start(router_config(Discovery::Etcd {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: prefix.clone(),
        security: Default::default(),
    }))
    .await;
    router
        .wait_for_workers(&[worker.addr], Duration::from_secs(5))
        .await;
    etcd.kill();
    let mut client = router.client().await;
    // Longer than the lease TTL: without etcd nothing expires, and the last set stays.
    let until = Instant::now() + Duration::from_secs(3);
    let mut answered = 0;
    while Instant::now() < until {
        let r = client
            .generate(small_request(4))
            .await
            .expect("routed with etcd down")
            .into_inner();
        assert_eq!(r.token_ids.len(), 4);
        answered += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered >= 10);
    let known: Vec<SocketAddr> = router
        .pool
        .addrs()
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(known, vec![worker.addr]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_engine_takes_its_worker_out_of_the_cluster() {
    use dimple_engine::{FaultInjection, FaultKind};
    use dimple_proto::worker;
    use tonic_health::pb::health_check_response::ServingStatus;

    let endpoint = test_etcd().await;
    let prefix = unique_prefix("engine-failure");
    let mut etcd_config = etcd_cfg(&endpoint, &prefix);
    // Long enough that the key can only go by being revoked.
    etcd_config.lease_ttl = Duration::from_secs(60);
    let fault = FaultInjection {
        rank: 0,
        forward_pass: 5,
        kind: FaultKind::Panic,
    };
    let mut w = WorkerProc::start_faulty(engine_config(), fault, Some(etcd_config));
    let etcd = etcd_client::Client::connect([endpoint.as_str()], None)
        .await
        .unwrap();
    let registered = || {
        let mut etcd = etcd.clone();
        let prefix = prefix.clone();
        async move {
            let opts = etcd_client::GetOptions::new().with_prefix();
            !etcd.get(prefix, Some(opts)).await.unwrap().kvs().is_empty()
        }
    };
    let t = Instant::now();
    while !registered().await {
        assert!(t.elapsed() < Duration::from_secs(5), "the worker registers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let serving = ServingStatus::Serving as i32;
    while health(w.addr, dimple_worker::server::SERVICE_NAME).await != serving {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the worker turns ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A request in flight when the engine fails is told so, distinctly.
    let mut client = worker::worker_client::WorkerClient::connect(format!("http://{}", w.addr))
        .await
        .unwrap();
    let req = worker::GenerateRequest {
        request_id: "victim".into(),
        prompt_ids: vec![5, 6, 7],
        images: vec![],
        params: Some(worker::DecodeParams {
            max_new_tokens: 64,
            steps: 64,
            alg: "maskgit_plus".into(),
            pipeline: "dim".into(),
            use_original_confidence: true,
            ..Default::default()
        }),
    };
    let mut stream = client.generate(req.clone()).await.unwrap().into_inner();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("no hang")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without the failure"),
            Err(s) => break s,
        }
    };
    let failed_at = Instant::now();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        dimple_proto::failure::is_engine_failed(&status),
        "{:?}",
        status.metadata()
    );
    assert!(
        status.message().contains("engine failed") && status.message().contains("injected"),
        "{}",
        status.message()
    );

    // NOT_SERVING and deregistered at once, long before the lease could expire; new
    // requests are refused.
    let not_serving = ServingStatus::NotServing as i32;
    loop {
        let ready = health(w.addr, dimple_worker::server::SERVICE_NAME).await;
        if ready == not_serving && !registered().await {
            break;
        }
        assert!(
            failed_at.elapsed() < Duration::from_secs(1),
            "still serving or registered {:?} after the failure",
            failed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "engine failure: NOT_SERVING and deregistered after {:?}",
        failed_at.elapsed()
    );
    let refused = client.generate(req).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(!w.worker.load().accepting);

    // Then the server ends with the engine's failure (the process exits non-zero).
    match w.ended(Duration::from_secs(10)).await {
        Err(dimple_worker::WorkerError::EngineFailed(why)) => assert!(why.contains("injected")),
        other => panic!("expected the engine failure, got {other:?}"),
    }
    assert!(
        failed_at.elapsed() >= Duration::from_secs(1),
        "a grace period first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_discovery_through_etcd_with_tls_and_a_password() {
    use dimple_proto::tls::EtcdSecurity;
    let pki = TestPki::new();
    pki.ca("etcd-ca");
    pki.leaf("etcd", "etcd-ca", "etcd-ca");
    let client = pki.leaf("etcd-client", "etcd-ca", "etcd-ca");
    let etcd = OwnEtcd::start_tls(&pki);
    let tls_only = EtcdSecurity {
        ca_pem: Some(client.ca_pem.clone()),
        client_pem: Some((client.cert_pem.clone(), client.key_pem.clone())),
        user: None,
    };
    let connect = |sec: &EtcdSecurity| {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_secs(2));
        if let Some(tls) = sec.tls() {
            opts = opts.with_tls(tls);
        }
        if let Some((u, p)) = &sec.user {
            opts = opts.with_user(u, p);
        }
        etcd_client::Client::connect([etcd.endpoint.clone()], Some(opts))
    };
    // Turn authentication on (the first admin has the root role).
    let t = Instant::now();
    let mut admin = loop {
        if let Ok(mut c) = connect(&tls_only).await
            && c.get("/ping", None).await.is_ok()
        {
            break c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the TLS etcd answers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    admin.user_add("root", "s3cret", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    let security = EtcdSecurity {
        user: Some(("root".into(), "s3cret".into())),
        ..tls_only.clone()
    };
    let wrong = EtcdSecurity {
        user: Some(("root".into(), "wrong".into())),
        ..tls_only.clone()
    };
    assert!(
        connect(&wrong).await.is_err(),
        "a wrong password is refused"
    );

    let prefix = unique_prefix("etcd-tls");
    let router = RouterProc::start(router_config(Discovery::Etcd {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: prefix.clone(),
        security: security.clone(),
    }))
    .await;
    let mut cfg = etcd_cfg(&etcd.endpoint, &prefix);
    cfg.security = security;
    let w = WorkerProc::start(engine_config(), Some(cfg));
    router
        .wait_for_workers(&[w.addr], Duration::from_secs(10))
        .await;
    router
        .client()
        .await
        .generate(small_request(4))
        .await
        .expect("a worker found through the secured etcd serves");
}
