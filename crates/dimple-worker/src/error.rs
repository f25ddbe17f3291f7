//! The worker's errors and their gRPC statuses.

use dimple_engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Convert(#[from] dimple_proto::convert::ConvertError),
    #[error("`images[{index}]`: {message}")]
    Image { index: usize, message: String },
    #[error("`params` must be set")]
    MissingParams,
    #[error("the worker is draining and takes no new requests")]
    Draining,
    /// The engine failed (model error or panic) while holding the request; the message says
    /// why. The status carries the cause for routers (`dimple_proto::failure`).
    #[error("{0}")]
    EngineFailed(String),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("internal: {0}")]
    Internal(String),
}

/// The status of an engine error: retryable ones (queue full, stopped) stay distinguishable.
fn engine_status(e: EngineError) -> tonic::Status {
    let msg = e.to_string();
    match e {
        EngineError::Invalid(_) | EngineError::Params(_) | EngineError::CacheImpossible { .. } => {
            tonic::Status::invalid_argument(msg)
        }
        EngineError::QueueFull { .. } => tonic::Status::resource_exhausted(msg),
        EngineError::Unavailable(_) => tonic::Status::unavailable(msg),
        EngineError::Model(_) => tonic::Status::internal(msg),
    }
}

impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        match e {
            WorkerError::Engine(e) => engine_status(e),
            WorkerError::Convert(e) => e.into(),
            e @ (WorkerError::Image { .. } | WorkerError::MissingParams) => {
                tonic::Status::invalid_argument(e.to_string())
            }
            e @ WorkerError::Draining => tonic::Status::unavailable(e.to_string()),
            WorkerError::EngineFailed(why) => dimple_proto::failure::engine_failed_status(why),
            e @ (WorkerError::Metrics(_)
            | WorkerError::Transport(_)
            | WorkerError::Reflection(_)
            | WorkerError::Internal(_)) => tonic::Status::internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_retryable_or_final_codes() {
        let s: tonic::Status = WorkerError::from(EngineError::QueueFull { limit: 4 }).into();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(s.message().contains("4"));
        let s: tonic::Status = WorkerError::from(EngineError::Unavailable("stopped".into())).into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        let s: tonic::Status =
            WorkerError::from(EngineError::Invalid("`prompt` is empty".into())).into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let s: tonic::Status = WorkerError::Image {
            index: 1,
            message: "bad".into(),
        }
        .into();
        assert_eq!(
            (s.code(), s.message()),
            (tonic::Code::InvalidArgument, "`images[1]`: bad")
        );
        let s: tonic::Status = WorkerError::Draining.into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(!dimple_proto::failure::is_engine_failed(&s));
        let s: tonic::Status = WorkerError::EngineFailed("the engine failed: boom".into()).into();
        assert!(dimple_proto::failure::is_engine_failed(&s));
        assert_eq!(s.message(), "the engine failed: boom");
    }
}
