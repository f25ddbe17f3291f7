//! The sockets a server runs on: its gRPC listener and, optionally, a second plaintext one
//! that serves only `grpc.health.v1`, so that Kubernetes probes work while the main port
//! needs TLS (or mutual TLS).

use tokio::net::TcpListener;

/// Listeners of one server, already bound.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    /// Plaintext, `grpc.health.v1` only; kept open until the server has drained.
    pub health: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(grpc: TcpListener) -> Self {
        Self { grpc, health: None }
    }
}
