//! The set of workers and the choice among them.
//!
//! Discovery (static list or etcd) publishes addresses with [`WorkerPool::set_addrs`]; the
//! pool keeps one lazily connected channel per worker and publishes an immutable snapshot
//! through a `watch` channel, so a request reads the set without locks. Each entry carries
//! this router's in-flight count and the load the worker last reported (polled, and
//! refreshed by every finished request). The choice is "least outstanding work": the larger
//! of this router's in-flight count and the worker's own outstanding count (which includes
//! other routers' requests), workers that failed recently or are draining last, ties broken
//! round-robin.
//!
//! A worker that stops answering (frozen, partitioned) would hold its in-flight requests
//! until HTTP/2 keep-alive gives up. Instead, each entry has a "down" signal that fires when
//! a load poll fails, or when a worker that left the set (its etcd lease is gone) no longer
//! answers a poll; attempts waiting on that worker end at once and are re-routed.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dimple_proto::worker::worker_client::WorkerClient;
use dimple_proto::worker::{InfoRequest, LoadReport, LoadRequest, WorkerInfo};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::RouterError;
use crate::retry::{RetryBudget, RetryBudgetConfig};
use dimple_proto::tls::InternalTls;

/// One worker as this router sees it.
pub struct WorkerEntry {
    pub addr: String,
    client: WorkerClient<Channel>,
    /// This router's requests on the worker.
    inflight: AtomicUsize,
    /// The worker's own outstanding count at its last report.
    reported: AtomicU32,
    /// Whether the last call or poll reached the worker.
    healthy: AtomicBool,
    /// Whether the worker takes requests (not draining, engine running).
    accepting: AtomicBool,
    info: OnceLock<WorkerInfo>,
    /// Bumped each time the worker is found not answering; attempts on it watch this.
    down: watch::Sender<u64>,
}

impl WorkerEntry {
    fn new(addr: &str, opts: &ChannelOptions) -> Result<Self, RouterError> {
        let scheme = if opts.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| RouterError::Setup(format!("worker address {addr:?}: {e}")))?;
        if let Some(tls) = &opts.tls {
            endpoint = endpoint
                .tls_config(tls.client())
                .map_err(|e| RouterError::Setup(format!("TLS to worker {addr}: {e}")))?;
        }
        let endpoint = endpoint
            .connect_timeout(opts.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let client = WorkerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(opts.max_message_bytes)
            .max_encoding_message_size(opts.max_message_bytes);
        Ok(Self {
            addr: addr.to_owned(),
            client,
            inflight: AtomicUsize::new(0),
            reported: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            accepting: AtomicBool::new(true),
            info: OnceLock::new(),
            down: watch::Sender::new(0),
        })
    }

    pub fn client(&self) -> WorkerClient<Channel> {
        self.client.clone()
    }

    /// Counts a request on this worker until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        InflightGuard(self.clone())
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// The work this worker has, as far as this router knows.
    pub fn outstanding(&self) -> usize {
        self.inflight()
            .max(self.reported.load(Ordering::Acquire) as usize)
    }

    pub fn record_load(&self, load: &LoadReport) {
        self.reported.store(load.outstanding, Ordering::Release);
        self.accepting.store(load.accepting, Ordering::Release);
        self.healthy.store(true, Ordering::Release);
    }

    /// A call could not reach the worker; it goes last until a poll reaches it again.
    pub fn mark_failed(&self) {
        self.healthy.store(false, Ordering::Release);
    }

    /// Completes the next time the worker is found not answering (after this call).
    pub fn went_down(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.down.subscribe();
        async move {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The worker does not answer: it goes last, and attempts waiting on it give up.
    fn signal_down(&self) {
        self.mark_failed();
        self.down.send_modify(|n| *n += 1);
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    fn is_preferred(&self) -> bool {
        self.is_healthy() && self.accepting.load(Ordering::Acquire)
    }

    pub fn info(&self) -> Option<&WorkerInfo> {
        self.info.get()
    }

    /// The worker's model info, asking it once.
    pub async fn fetch_info(&self, timeout: Duration) -> Result<&WorkerInfo, tonic::Status> {
        if let Some(i) = self.info.get() {
            return Ok(i);
        }
        let mut req = tonic::Request::new(InfoRequest {});
        req.set_timeout(timeout);
        let info = self.client().info(req).await?.into_inner();
        Ok(self.info.get_or_init(|| info))
    }

    /// Asks for the load; false when the worker did not answer in time.
    async fn poll(&self, timeout: Duration) -> bool {
        let mut req = tonic::Request::new(LoadRequest {});
        req.set_timeout(timeout);
        match tokio::time::timeout(timeout, self.client().load(req)).await {
            Ok(Ok(r)) => {
                self.record_load(r.get_ref());
                if self.info.get().is_none() {
                    let _ = self.fetch_info(timeout).await;
                }
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(addr = %self.addr, error = %e, "load poll failed");
                self.signal_down();
                false
            }
            Err(_) => {
                tracing::warn!(addr = %self.addr, ?timeout, "load poll timed out; re-routing its requests");
                self.signal_down();
                false
            }
        }
    }

    /// A worker that left the set while requests still run on it: a clean drain keeps
    /// answering polls until they finish; a dead or frozen worker does not, and its
    /// requests are re-routed.
    async fn watch_departed(self: Arc<Self>, interval: Duration) {
        while self.inflight() > 0 {
            if !self.poll(POLL_TIMEOUT).await {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    }
}

/// Decrements a worker's in-flight count when dropped.
pub struct InflightGuard(Arc<WorkerEntry>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A load poll waits this long for its answer. The worker answers from its gRPC runtime,
/// never behind the engine, so only a frozen or unreachable worker takes this long; short
/// enough to re-route that worker's requests within about a second, long enough not to
/// mistake a loaded machine for a frozen worker.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);

/// How the router dials workers.
#[derive(Debug, Clone)]
pub struct ChannelOptions {
    /// Mutual TLS with workers: their certificates must chain to `ca_pem`.
    pub tls: Option<InternalTls>,
    pub connect_timeout: Duration,
    pub max_message_bytes: usize,
    /// How often workers' load is polled (also how often a departed worker is checked).
    pub poll_interval: Duration,
    pub retry_budget: RetryBudgetConfig,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            max_message_bytes: 64 << 20,
            poll_interval: Duration::from_secs(1),
            retry_budget: RetryBudgetConfig::default(),
            tls: None,
        }
    }
}

type Snapshot = Arc<Vec<Arc<WorkerEntry>>>;

/// The known workers. Cheap to clone.
#[derive(Clone)]
pub struct WorkerPool {
    tx: Arc<watch::Sender<Snapshot>>,
    opts: ChannelOptions,
    next: Arc<AtomicUsize>,
    retry_budget: Arc<RetryBudget>,
}

impl WorkerPool {
    pub fn new(opts: ChannelOptions) -> Self {
        let (tx, _) = watch::channel(Arc::new(Vec::new()));
        Self {
            tx: Arc::new(tx),
            retry_budget: Arc::new(RetryBudget::new(opts.retry_budget)),
            opts,
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The budget every retry across workers is taken from.
    pub fn retry_budget(&self) -> &RetryBudget {
        &self.retry_budget
    }

    /// Replaces the set of workers; entries of addresses still present are kept (with their
    /// connection and counters).
    pub fn set_addrs(&self, addrs: &BTreeSet<String>) {
        let current = self.snapshot();
        let mut next = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if let Some(e) = current.iter().find(|e| &e.addr == addr) {
                next.push(e.clone());
                continue;
            }
            match WorkerEntry::new(addr, &self.opts) {
                Ok(e) => next.push(Arc::new(e)),
                Err(e) => tracing::warn!(error = %e, "ignoring a worker"),
            }
        }
        let changed = next.len() != current.len()
            || next
                .iter()
                .zip(current.iter())
                .any(|(a, b)| a.addr != b.addr);
        if changed {
            tracing::info!(workers = ?next.iter().map(|e| e.addr.as_str()).collect::<Vec<_>>(), "worker set changed");
        }
        let departed = current
            .iter()
            .filter(|e| e.inflight() > 0 && !next.iter().any(|n| Arc::ptr_eq(n, e)));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            for e in departed {
                rt.spawn(e.clone().watch_departed(self.opts.poll_interval));
            }
        }
        self.tx.send_replace(Arc::new(next));
    }

    pub fn snapshot(&self) -> Snapshot {
        self.tx.borrow().clone()
    }

    pub fn addrs(&self) -> Vec<String> {
        self.snapshot().iter().map(|e| e.addr.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether some worker is reachable and accepting (readiness of the router).
    pub fn any_ready(&self) -> bool {
        self.snapshot().iter().any(|e| e.is_preferred())
    }

    /// Waits until the set changes (for tests and tools).
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.tx.subscribe()
    }

    /// Workers in the order to try them: preferred (reachable, accepting) first, then by
    /// least outstanding work; ties rotate so equal workers share the load.
    pub fn ranked(&self) -> Vec<Arc<WorkerEntry>> {
        let snap = self.snapshot();
        let n = snap.len();
        if n == 0 {
            return Vec::new();
        }
        let offset = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut order: Vec<(usize, Arc<WorkerEntry>)> = snap
            .iter()
            .enumerate()
            .map(|(i, e)| ((i + n - offset) % n, e.clone()))
            .collect();
        order.sort_by_key(|(rot, e)| (!e.is_preferred(), e.outstanding(), *rot));
        order.into_iter().map(|(_, e)| e).collect()
    }

    /// The model info of any worker, asking workers in turn when none has answered yet.
    pub async fn model_info(&self, timeout: Duration) -> Result<WorkerInfo, RouterError> {
        let ranked = self.ranked();
        if ranked.is_empty() {
            return Err(RouterError::NoWorkers);
        }
        if let Some(i) = ranked.iter().find_map(|e| e.info()) {
            return Ok(i.clone());
        }
        let mut last = None;
        for e in &ranked {
            match e.fetch_info(timeout).await {
                Ok(i) => return Ok(i.clone()),
                Err(s) => {
                    e.mark_failed();
                    last = Some(format!("{}: {}", e.addr, s.message()));
                }
            }
        }
        Err(RouterError::Unavailable(format!(
            "no worker answered: {}",
            last.unwrap_or_else(|| "no workers".into())
        )))
    }

    /// Polls every worker's load each `interval` until `stop` turns true.
    pub async fn run_poller(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {}
            }
            // Concurrently, so that one frozen worker does not delay noticing another; each
            // poll is bounded by its timeout, and waiting for all keeps one round at a time.
            let mut polls = tokio::task::JoinSet::new();
            for e in self.snapshot().iter() {
                let e = e.clone();
                polls.spawn(async move { e.poll(POLL_TIMEOUT).await });
            }
            while polls.join_next().await.is_some() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(addrs: &[&str]) -> WorkerPool {
        let p = WorkerPool::new(ChannelOptions::default());
        p.set_addrs(&addrs.iter().map(|s| s.to_string()).collect());
        p
    }

    #[tokio::test]
    async fn least_outstanding_first_and_failed_last() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let snap = p.snapshot();
        let _a = snap[0].begin();
        let _a2 = snap[0].begin();
        snap[1].record_load(&LoadReport {
            outstanding: 1,
            accepting: true,
            ..Default::default()
        });
        snap[2].record_load(&LoadReport {
            outstanding: 5,
            accepting: true,
            ..Default::default()
        });
        for _ in 0..3 {
            let order: Vec<_> = p.ranked().iter().map(|e| e.addr.clone()).collect();
            assert_eq!(order, ["127.0.0.1:2", "127.0.0.1:1", "127.0.0.1:3"]);
        }
        snap[1].mark_failed();
        assert_eq!(p.ranked().last().unwrap().addr, "127.0.0.1:2");
        snap[2].record_load(&LoadReport {
            outstanding: 0,
            accepting: false,
            ..Default::default()
        });
        assert_eq!(
            p.ranked()[0].addr,
            "127.0.0.1:1",
            "a draining worker goes after accepting ones"
        );
    }

    #[tokio::test]
    async fn ties_rotate_and_entries_survive_updates() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2"]);
        let firsts: BTreeSet<String> = (0..4).map(|_| p.ranked()[0].addr.clone()).collect();
        assert_eq!(firsts.len(), 2, "equal workers alternate");
        let kept = p.snapshot()[0].clone();
        let _g = kept.begin();
        p.set_addrs(
            &["127.0.0.1:1", "127.0.0.1:9"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        );
        assert_eq!(p.addrs(), ["127.0.0.1:1", "127.0.0.1:9"]);
        assert_eq!(
            p.snapshot()[0].inflight(),
            1,
            "the kept entry keeps its counters"
        );
        p.set_addrs(&BTreeSet::new());
        assert!(p.ranked().is_empty());
    }

    #[tokio::test]
    async fn model_info_with_no_workers_is_unavailable_at_once() {
        let p = pool(&[]);
        let t = std::time::Instant::now();
        let e = p.model_info(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(e, RouterError::NoWorkers));
        assert!(t.elapsed() < Duration::from_millis(100));
    }
}
