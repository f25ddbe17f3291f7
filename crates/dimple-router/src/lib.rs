//! The public-facing side of the cluster: the `dimple.v1.Dimple` gRPC service.
//!
//! Layout: `prompt` (tokenizer and chat template), `validate` (requests into
//! [`validate::ValidRequest`]: prompt ids, image header probe, resolved parameters, limits),
//! `pool` (known workers, least-outstanding choice, load polling, re-routing away from
//! workers that stop answering), `retry` (the router-wide retry budget), `discovery` (static list
//! or etcd watch), `service` (the gRPC service: dispatch, retries, streaming, deadlines,
//! cancellation), `auth` (API keys), `metrics`, `server` ([`serve`]: TLS, health, reflection,
//! graceful drain), `error`.
//!
//! The router never sees tensors or batches: it turns requests into token ids and chooses
//! the worker that decodes them.

pub mod auth;
pub mod discovery;
pub mod error;
pub mod metrics;
pub mod pool;
pub mod prompt;
pub mod retry;
pub mod server;
pub mod service;
pub mod validate;

pub use auth::ApiKeys;
pub use discovery::Discovery;
pub use error::RouterError;
pub use server::{Router, RouterConfig, TlsIdentity, serve};
