//! Registration in etcd: the worker's record under `<prefix><address>`, attached to a lease
//! that a background task keeps alive. If etcd goes away the task retries with backoff and
//! registers again (new lease) once etcd is back; on shutdown it revokes the lease, which
//! removes the key at once. If the worker dies without revoking, the lease expires after its
//! TTL and routers drop the worker.

use std::time::Duration;

use dimple_proto::discovery::WorkerRecord;
use dimple_proto::tls::EtcdSecurity;
use etcd_client::{Client, ConnectOptions, PutOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where and how to register.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `http://host:port` of etcd members.
    pub endpoints: Vec<String>,
    /// Key prefix shared with the routers, e.g. `/dimple/workers/`.
    pub prefix: String,
    /// Lease TTL: how long a dead worker stays registered at most.
    pub lease_ttl: Duration,
    /// TLS and credentials for etcd.
    pub security: EtcdSecurity,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("the lease expired (etcd answered TTL 0)")]
    Expired,
    #[error("etcd closed the keep-alive stream")]
    StreamClosed,
    #[error("no keep-alive answer within {0:?}")]
    Timeout(Duration),
}

/// A live registration; [`Registration::deregister`] removes it.
pub struct Registration {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    registered: watch::Receiver<bool>,
}

impl Registration {
    /// Starts registering `record` in the background (it keeps retrying while etcd is away).
    pub fn start(cfg: EtcdConfig, record: WorkerRecord) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let (registered_tx, registered) = watch::channel(false);
        let task = tokio::spawn(run(cfg, record, stop_rx, registered_tx));
        Self {
            stop,
            task,
            registered,
        }
    }

    /// Whether the worker's key is in etcd under a live lease (false while etcd is away).
    pub fn registered(&self) -> watch::Receiver<bool> {
        self.registered.clone()
    }

    /// Revokes the lease (so routers drop this worker at once) and stops the task. Bounded:
    /// gives up after a few seconds when etcd does not answer.
    pub async fn deregister(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .is_err()
        {
            tracing::warn!("etcd deregistration timed out; the lease will expire on its own");
        }
    }
}

async fn run(
    cfg: EtcdConfig,
    record: WorkerRecord,
    mut stop: watch::Receiver<bool>,
    registered: watch::Sender<bool>,
) {
    let key = record.key(&cfg.prefix);
    let value = record.to_json();
    let ttl = cfg.lease_ttl.max(Duration::from_secs(1));
    let mut backoff = Duration::from_millis(200);
    loop {
        let result = session(&cfg, ttl, &key, &value, &mut stop, &registered).await;
        registered.send_replace(false);
        match result {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, %key, "etcd registration lost; retrying"),
        }
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(ttl / 2).max(Duration::from_millis(200));
    }
}

/// One registration: connect, grant a lease, put the key, keep the lease alive. Returns
/// `Ok` after revoking on stop, `Err` when etcd failed.
async fn session(
    cfg: &EtcdConfig,
    ttl: Duration,
    key: &str,
    value: &str,
    stop: &mut watch::Receiver<bool>,
    registered: &watch::Sender<bool>,
) -> Result<(), SessionError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(ttl);
    if let Some(tls) = cfg.security.tls() {
        opts = opts.with_tls(tls);
    }
    if let Some((user, password)) = &cfg.security.user {
        opts = opts.with_user(user, password);
    }
    let mut client = Client::connect(&cfg.endpoints, Some(opts)).await?;
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let lease = client.lease_grant(ttl_secs, None).await?.id();
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await?;
    tracing::info!(%key, lease, "registered in etcd");
    registered.send_replace(true);
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
    let mut tick = tokio::time::interval(ttl / 3);
    loop {
        tokio::select! {
            _ = stopped(stop) => {
                if let Err(e) = client.lease_revoke(lease).await {
                    tracing::warn!(error = %e, %key, "cannot revoke the lease; it will expire");
                } else {
                    tracing::info!(%key, "deregistered from etcd");
                }
                return Ok(());
            }
            _ = tick.tick() => {
                keeper.keep_alive().await?;
                match tokio::time::timeout(ttl, answers.message()).await {
                    Err(_) => return Err(SessionError::Timeout(ttl)),
                    Ok(Err(e)) => return Err(e.into()),
                    Ok(Ok(None)) => return Err(SessionError::StreamClosed),
                    Ok(Ok(Some(a))) if a.ttl() <= 0 => return Err(SessionError::Expired),
                    Ok(Ok(Some(_))) => {}
                }
            }
        }
    }
}

/// Completes once the stop flag is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
