//! TLS inside the cluster: mutual TLS between routers and workers (each side presents a
//! certificate signed by the cluster's CA and checks the other's), and TLS plus
//! username/password towards etcd. All optional: a local cluster runs in plaintext.

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// This component's certificate and key, and the CA its peers' certificates must chain to
/// (PEM).
#[derive(Clone)]
pub struct InternalTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub ca_pem: Vec<u8>,
}

impl std::fmt::Debug for InternalTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalTls").finish_non_exhaustive()
    }
}

impl InternalTls {
    /// The server side: presents our certificate, requires a client certificate from the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// The client side: checks the server's certificate against the CA, presents ours.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
    }
}

/// How to reach a secured etcd (endpoints then use `https://`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EtcdSecurity {
    /// CA that etcd's server certificate chains to; TLS is on when set.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key (PEM), when etcd requires client certificates.
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Username and password, when etcd has authentication on.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("tls", &self.ca_pem.is_some())
            .field("client_cert", &self.client_pem.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl EtcdSecurity {
    /// The TLS settings for etcd's client, `None` for plaintext.
    pub fn tls(&self) -> Option<ClientTlsConfig> {
        let ca = self.ca_pem.as_ref()?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &self.client_pem {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Some(tls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let sec = EtcdSecurity {
            ca_pem: Some(b"ca".to_vec()),
            client_pem: None,
            user: Some(("dimple".into(), "hunter2".into())),
        };
        let shown = format!("{sec:?}");
        assert!(
            shown.contains("dimple") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(sec.tls().is_some());
        assert!(EtcdSecurity::default().tls().is_none());
        let internal = InternalTls {
            cert_pem: b"c".to_vec(),
            key_pem: b"secret-key".to_vec(),
            ca_pem: b"a".to_vec(),
        };
        assert!(!format!("{internal:?}").contains("secret-key"));
    }
}
