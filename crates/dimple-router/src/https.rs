//! The HTTP API over TLS, with the certificate and key of the gRPC listener.
//!
//! Connections are accepted on a task of their own; each TLS handshake runs on its own task
//! with a deadline, at most [`MAX_HANDSHAKES`] at once (a connection beyond that is closed at
//! once), so a client that stalls its handshake holds neither the accept loop nor the
//! server. Finished handshakes are handed to the same server as plain HTTP (`axum::serve`):
//! the same routes, drain and limits.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;

use crate::http::HttpApi;
use crate::{RouterError, TlsIdentity};

/// Longest a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once.
const MAX_HANDSHAKES: usize = 256;
/// Finished handshakes waiting for the server to take them.
const READY_QUEUE: usize = 64;

/// The TLS side of the HTTPS listener, checked before anything is served.
#[derive(Clone)]
pub struct HttpsIdentity(TlsAcceptor);

impl HttpsIdentity {
    /// Reads the certificate chain and key of `tls`; an error names what is wrong with them.
    pub fn new(tls: &TlsIdentity) -> Result<Self, RouterError> {
        Ok(Self(TlsAcceptor::from(Arc::new(server_config(tls)?))))
    }
}

/// Serves the HTTP API over TLS on `listener` until `shutdown` completes (as
/// [`crate::serve_http`] does over plain TCP).
pub async fn serve_https(
    listener: TcpListener,
    api: HttpApi,
    tls: HttpsIdentity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let acceptor = tls.0;
    let local = listener
        .local_addr()
        .map_err(|e| RouterError::Setup(format!("HTTPS listener address: {e}")))?;
    let (ready, incoming) = mpsc::channel(READY_QUEUE);
    let accepting = tokio::spawn(accept_loop(listener, acceptor, ready));
    let served = crate::http::serve_on(
        TlsListener { local, incoming },
        api,
        shutdown,
        "HTTPS API serving",
    )
    .await;
    accepting.abort();
    served
}

/// The rustls settings for `tls`: its chain and key, HTTP/1.1 by ALPN.
fn server_config(tls: &TlsIdentity) -> Result<ServerConfig, RouterError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        RouterError::Setup(format!("HTTPS: the TLS {what}: {e}"))
    };
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("certificate", &e))?;
    if certs.is_empty() {
        return Err(RouterError::Setup(
            "HTTPS: the TLS certificate file holds no certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|e| bad("key", &e))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("settings", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("certificate and key", &e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "HTTPS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = MAX_HANDSHAKES, "too many TLS handshakes in progress; connection closed");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = ready.send((stream, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// Connections whose handshake is done, as `axum::serve` takes them.
struct TlsListener {
    local: SocketAddr,
    incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(c) => c,
            // The accept loop ended: no connection will come again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
