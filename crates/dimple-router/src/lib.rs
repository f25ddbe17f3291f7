//! The public-facing side of the cluster: one request front-end behind the
//! `dimple.v1.Dimple` gRPC service and the OpenAI-compatible HTTP API.
//!
//! Layout: `frontend` ([`frontend::Frontend`]: the one path every request takes —
//! validation, prompts, priors, rendering, usage, stop strings — whatever the entry point),
//! `backend` (the [`backend::Backend`] trait that decodes validated requests),
//! `pool_backend` (the worker pool over gRPC as a backend: choice, retries, streaming),
//! `prompt` (tokenizer and chat template), `validate` (requests into
//! [`validate::ValidRequest`]: prompt ids, image header probe, resolved parameters, limits),
//! `pool` (known workers, least-outstanding choice, load polling, re-routing away from
//! workers that stop answering), `retry` (the router-wide retry budget), `discovery` (static
//! list or etcd watch), `service` (the gRPC service), `http` (the OpenAI-compatible HTTP API),
//! `auth` (API keys), `metrics`, `server` ([`serve`]: TLS, health, reflection, graceful
//! drain), `error` (one error type; its codes map to gRPC and HTTP statuses).
//!
//! The in-process backend (an engine in the same process, for `dimple serve`, `generate`,
//! `sweep` and `bench`) is `dimple_worker::LocalBackend`: it implements
//! [`backend::Backend`] there because this crate never imports the model or the engine.
//! The router never sees tensors or batches: it turns requests into token ids and back.

pub mod auth;
pub mod backend;
pub mod discovery;
pub mod error;
pub mod frontend;
pub mod http;
mod https;
pub mod metrics;
pub mod pool;
pub mod pool_backend;
pub mod prompt;
pub mod retry;
pub mod server;
pub mod service;
pub mod validate;

pub use auth::ApiKeys;
pub use backend::Backend;
pub use discovery::Discovery;
pub use error::RouterError;
pub use frontend::Frontend;
pub use http::{HttpApi, serve_http};
pub use https::{HttpsIdentity, serve_https};
pub use server::{Router, RouterConfig, TlsIdentity, serve};
