//! API keys: when configured, every call to the public service must carry
//! `authorization: Bearer <key>` with one of the keys. Health checks and reflection stay open
//! (probes and tooling run without credentials).
//!
//! Keys read from a file can rotate without a restart: [`ApiKeys::watch_file`] re-reads the
//! file when its modification time changes, and [`ApiKeys::reload`] re-reads it at once (the
//! binary calls it on SIGHUP). A file that cannot be read or holds no key leaves the current
//! keys in force: a bad rotation must not open the service or lock everyone out.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tonic::{Request, Status};

/// The accepted keys; empty means no authentication. Cheap to clone (clones share the keys).
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Arc<RwLock<Arc<Vec<String>>>>,
    /// The file the keys come from, if any, and its modification time when last read.
    source: Option<Arc<(PathBuf, RwLock<Option<SystemTime>>)>>,
}

impl ApiKeys {
    pub fn new(keys: Vec<String>) -> Self {
        Self {
            keys: Arc::new(RwLock::new(Arc::new(keys))),
            source: None,
        }
    }

    /// One key per line; blank lines and lines starting with `#` are skipped.
    pub fn from_file(path: &Path) -> std::io::Result<Self> {
        let modified = std::fs::metadata(path)?.modified().ok();
        let text = std::fs::read_to_string(path)?;
        Ok(Self {
            source: Some(Arc::new((path.to_owned(), RwLock::new(modified)))),
            ..Self::parse(&text)
        })
    }

    pub fn parse(text: &str) -> Self {
        Self::new(parse_keys(text))
    }

    fn current(&self) -> Arc<Vec<String>> {
        // A poisoned lock still holds a whole key list (it is replaced, never edited).
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_empty(&self) -> bool {
        self.current().is_empty()
    }

    /// Re-reads the key file (no-op without one). Returns whether the keys changed.
    pub fn reload(&self) -> bool {
        let Some(source) = &self.source else {
            return false;
        };
        let (path, seen) = &**source;
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let keys = match std::fs::read_to_string(path) {
            Ok(text) => parse_keys(&text),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot re-read the API keys; keeping the current ones");
                return false;
            }
        };
        *seen.write().unwrap_or_else(|e| e.into_inner()) = modified;
        if keys.is_empty() {
            tracing::warn!(path = %path.display(), "the API key file holds no key; keeping the current ones");
            return false;
        }
        let changed = *self.current() != keys;
        if changed {
            *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
            tracing::info!(path = %path.display(), "API keys reloaded");
        }
        changed
    }

    /// Re-reads the key file whenever its modification time changes, checking every
    /// `interval`, until `stop` turns true. Returns at once without a file.
    pub async fn watch_file(
        self,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let Some(source) = self.source.clone() else {
            return;
        };
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let modified = std::fs::metadata(&source.0).and_then(|m| m.modified()).ok();
            let seen = *source.1.read().unwrap_or_else(|e| e.into_inner());
            if modified.is_some() && modified != seen {
                self.reload();
            }
        }
    }

    /// The interceptor check.
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.check_header(header)?;
        Ok(req)
    }

    /// Checks an `authorization` header value (gRPC metadata or HTTP header).
    pub fn check_header(&self, header: Option<&str>) -> Result<(), Status> {
        let keys = self.current();
        if keys.is_empty() {
            return Ok(());
        }
        let given = header
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("`authorization: Bearer <key>` is required"))?;
        // Compare against every key without stopping early, so timing does not tell which
        // prefix matched.
        let ok = keys.iter().fold(false, |acc, k| {
            acc | constant_time_eq(k.as_bytes(), given.as_bytes())
        });
        if ok {
            Ok(())
        } else {
            Err(Status::unauthenticated("the API key is not valid"))
        }
    }
}

fn parse_keys(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(v: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut().insert("authorization", v.parse().unwrap());
        r
    }

    #[test]
    fn bearer_keys() {
        let keys = ApiKeys::parse("# comment\nk1\n\n  k2  \n");
        assert!(keys.check(with_auth("Bearer k1")).is_ok());
        assert!(keys.check(with_auth("Bearer k2")).is_ok());
        assert_eq!(
            keys.check(with_auth("Bearer k3")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            keys.check(with_auth("k1")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            keys.check(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(ApiKeys::default().check(Request::new(())).is_ok());
    }

    #[test]
    fn a_reload_swaps_the_keys_but_never_to_none() {
        let path = std::env::temp_dir().join(format!("dimple-keys-{}", std::process::id()));
        std::fs::write(&path, "old\n").unwrap();
        let keys = ApiKeys::from_file(&path).unwrap();
        let shared = keys.clone();
        std::fs::write(&path, "new\n").unwrap();
        assert!(keys.reload());
        assert!(
            shared.check(with_auth("Bearer new")).is_ok(),
            "clones see the new keys"
        );
        assert!(shared.check(with_auth("Bearer old")).is_err());
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(!keys.reload());
        assert!(
            keys.check(with_auth("Bearer new")).is_ok(),
            "an empty file changes nothing"
        );
        let _ = std::fs::remove_file(&path);
    }
}
