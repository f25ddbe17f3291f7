//! API keys: when configured, every call to the public service must carry
//! `authorization: Bearer <key>` with one of the keys. Health checks and reflection stay open
//! (probes and tooling run without credentials).

use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Status};

/// The accepted keys; empty means no authentication.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys(Arc<Vec<String>>);

impl ApiKeys {
    pub fn new(keys: Vec<String>) -> Self {
        Self(Arc::new(keys))
    }

    /// One key per line; blank lines and lines starting with `#` are skipped.
    pub fn from_file(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Self {
        Self::new(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
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
        if self.0.is_empty() {
            return Ok(());
        }
        let given = header
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("`authorization: Bearer <key>` is required"))?;
        // Compare against every key without stopping early, so timing does not tell which
        // prefix matched.
        let ok = self.0.iter().fold(false, |acc, k| {
            acc | constant_time_eq(k.as_bytes(), given.as_bytes())
        });
        if ok {
            Ok(())
        } else {
            Err(Status::unauthenticated("the API key is not valid"))
        }
    }
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
}
