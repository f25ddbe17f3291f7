//! Where the workers come from: a static list, or etcd.
//!
//! With etcd the router lists the prefix, then watches it from the next revision; each put
//! adds (or updates) a worker, each delete (explicit, or a lease that expired) removes it.
//! When etcd goes away the last known set stays in force, and the router reconnects with
//! backoff and lists again (the list is authoritative: it replaces whatever changed meanwhile).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dimple_proto::discovery::WorkerRecord;
use dimple_proto::tls::EtcdSecurity;
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

use crate::pool::WorkerPool;

/// How workers are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// `host:port` of each worker.
    Static(Vec<String>),
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        security: EtcdSecurity,
    },
}

#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("the watch was cancelled by etcd: {0}")]
    Cancelled(String),
    #[error("etcd closed the watch stream")]
    Closed,
}

/// Keeps `pool` in line with `discovery` until `stop` turns true.
pub async fn run(discovery: Discovery, pool: WorkerPool, mut stop: watch::Receiver<bool>) {
    match discovery {
        Discovery::Static(addrs) => {
            pool.set_addrs(&addrs.into_iter().collect());
        }
        Discovery::Etcd {
            endpoints,
            prefix,
            security,
        } => {
            let mut backoff = Duration::from_millis(100);
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    r = watch_prefix(&endpoints, &prefix, &security, &pool) => {
                        let e = match r { Ok(()) => WatchError::Closed, Err(e) => e };
                        tracing::warn!(error = %e, workers = pool.len(), "etcd discovery interrupted; keeping the last known workers");
                    }
                }
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// One etcd session: list, then follow the watch until it fails.
async fn watch_prefix(
    endpoints: &[String],
    prefix: &str,
    security: &EtcdSecurity,
    pool: &WorkerPool,
) -> Result<(), WatchError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    if let Some(tls) = security.tls() {
        opts = opts.with_tls(tls);
    }
    if let Some((user, password)) = &security.user {
        opts = opts.with_user(user, password);
    }
    let mut client = Client::connect(endpoints, Some(opts)).await?;
    let listed = tokio::time::timeout(
        Duration::from_secs(5),
        client.get(prefix, Some(GetOptions::new().with_prefix())),
    )
    .await
    .map_err(|_| WatchError::Cancelled("listing the prefix timed out".into()))??;
    let revision = listed.header().map_or(0, |h| h.revision());
    let mut known: BTreeMap<String, String> = BTreeMap::new();
    for kv in listed.kvs() {
        if let Some((key, addr)) = entry(kv.key(), kv.value(), prefix) {
            known.insert(key, addr);
        }
    }
    publish(pool, &known);
    let mut stream = client
        .watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    while let Some(resp) = stream.message().await? {
        if resp.canceled() {
            return Err(WatchError::Cancelled(resp.cancel_reason().to_owned()));
        }
        let mut changed = false;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match ev.event_type() {
                EventType::Put => {
                    if let Some((key, addr)) = entry(kv.key(), kv.value(), prefix) {
                        changed |= known.insert(key, addr.clone()).as_ref() != Some(&addr);
                    }
                }
                EventType::Delete => changed |= known.remove(&key).is_some(),
            }
        }
        if changed {
            publish(pool, &known);
        }
    }
    Err(WatchError::Closed)
}

/// A registered worker: its key and address (from the JSON record, else the key's suffix).
fn entry(key: &[u8], value: &[u8], prefix: &str) -> Option<(String, String)> {
    let key = String::from_utf8_lossy(key).into_owned();
    let addr = match WorkerRecord::from_json(value) {
        Ok(r) => r.addr,
        Err(e) => {
            tracing::warn!(%key, error = %e, "worker record is not valid JSON; using the key");
            key.strip_prefix(prefix)?.to_owned()
        }
    };
    (!addr.is_empty()).then_some((key, addr))
}

fn publish(pool: &WorkerPool, known: &BTreeMap<String, String>) {
    let addrs: BTreeSet<String> = known.values().cloned().collect();
    pool.set_addrs(&addrs);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_from_the_record_or_the_key() {
        let rec = r#"{"addr":"10.1.2.3:50061","model":"m","tp":1,"capacity":{"max_active":1,"max_waiting":1,"cache_budget_bytes":1}}"#;
        assert_eq!(
            entry(b"/p/x", rec.as_bytes(), "/p/"),
            Some(("/p/x".to_owned(), "10.1.2.3:50061".to_owned()))
        );
        assert_eq!(
            entry(b"/p/h:1", b"junk", "/p/"),
            Some(("/p/h:1".to_owned(), "h:1".to_owned()))
        );
        assert_eq!(entry(b"/other/h:1", b"junk", "/p/"), None);
    }
}
