//! The worker: one tensor-parallel group running one engine, behind the internal
//! `dimple.worker.v1.Worker` gRPC service.
//!
//! Layout: `worker` (the [`Worker`] handle: engine, image preprocessing, metrics, load),
//! `service` (the gRPC service: submission, event streaming, deadlines), `local`
//! ([`LocalBackend`]: the worker as the router front-end's in-process backend), `registration`
//! (etcd lease with keep-alive), `server` ([`serve`]: gRPC + health + reflection on a bound
//! listener, graceful drain), `assets` (the tokenizer and chat template files served to
//! routers), `metrics`, `error`.
//!
//! The worker never sees text or chat templates: requests arrive as token ids, with images
//! as encoded bytes that it decodes and preprocesses itself (over gRPC, or from the
//! router's front-end in the same process through [`LocalBackend`]).

pub mod assets;
pub mod error;
pub mod local;
pub mod metrics;
pub mod registration;
pub mod server;
pub mod service;
pub mod worker;

pub use error::WorkerError;
pub use local::{LocalBackend, image_limits};
pub use registration::{EtcdConfig, Registration};
pub use server::{ServeOptions, serve, supervise};
pub use worker::{Worker, WorkerConfig, default_max_new_tokens};
