//! What a worker registers in etcd and routers read back: one key per worker under a
//! configurable prefix (`<prefix><advertised address>`), attached to the worker's lease, with
//! this JSON record as the value.

use serde::{Deserialize, Serialize};

/// Default etcd key prefix under which workers register.
pub const DEFAULT_PREFIX: &str = "/dimple/workers/";

/// The value of a worker's etcd key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// `host:port` of the worker's gRPC service, as routers should dial it.
    pub addr: String,
    /// The served model's name.
    pub model: String,
    /// Tensor-parallel ranks of the worker.
    pub tp: usize,
    pub capacity: Capacity,
}

/// How much work the worker takes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub max_active: usize,
    pub max_waiting: usize,
    pub cache_budget_bytes: usize,
}

impl WorkerRecord {
    /// The etcd key of this record under `prefix`.
    pub fn key(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.addr)
    }

    pub fn to_json(&self) -> String {
        // A struct of strings and integers always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_keys_by_address() {
        let r = WorkerRecord {
            addr: "10.0.0.7:50061".into(),
            model: "dimple-demo".into(),
            tp: 2,
            capacity: Capacity {
                max_active: 64,
                max_waiting: 256,
                cache_budget_bytes: 1 << 30,
            },
        };
        assert_eq!(WorkerRecord::from_json(r.to_json().as_bytes()).unwrap(), r);
        assert_eq!(r.key(DEFAULT_PREFIX), "/dimple/workers/10.0.0.7:50061");
    }
}
