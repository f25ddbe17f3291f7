//! The worker: one tensor-parallel group running one engine, behind the internal
//! `dimple.worker.v1.Worker` gRPC service.
//!
//! Layout: `worker` (the [`Worker`] handle: engine, metrics, load), `service` (the gRPC
//! service: image preprocessing, submission, event streaming, deadlines), `registration`
//! (etcd lease with keep-alive), `server` ([`serve`]: gRPC + health + reflection on a bound
//! listener, graceful drain), `assets` (the tokenizer and chat template files served to
//! routers), `metrics`, `error`.
//!
//! The worker never sees text or chat templates: requests arrive as token ids, with images
//! as encoded bytes that it decodes and preprocesses itself.

pub mod assets;
pub mod error;
pub mod metrics;
pub mod registration;
pub mod server;
pub mod service;
pub mod worker;

pub use error::WorkerError;
pub use registration::{EtcdConfig, Registration};
pub use server::{ServeOptions, serve};
pub use worker::{Worker, WorkerConfig};
