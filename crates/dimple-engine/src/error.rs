//! The engine's error type. Each variant maps to one client-facing status at the service
//! edge (invalid input, resources exhausted, unavailable, internal).

use dimple_core::params::ParamError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The request can never be served as given.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Params(#[from] ParamError),
    /// The waiting queue is full; retry later.
    #[error("the waiting queue is full ({limit} requests)")]
    QueueFull { limit: usize },
    /// The request's prefix cache would not fit even in an empty pool.
    #[error(
        "the request needs {needed} bytes of prefix cache, more than the whole pool ({budget} bytes)"
    )]
    CacheImpossible { needed: usize, budget: usize },
    /// The engine has stopped (shut down, or failed and is unhealthy).
    #[error("the engine is not running: {0}")]
    Unavailable(String),
    /// The model failed while running a step of this request.
    #[error("model failure: {0}")]
    Model(String),
}

impl From<dimple_model::ModelError> for EngineError {
    fn from(e: dimple_model::ModelError) -> Self {
        match e {
            dimple_model::ModelError::Input(m) | dimple_model::ModelError::Image(m) => {
                EngineError::Invalid(m)
            }
            other => EngineError::Model(other.to_string()),
        }
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Model(e.to_string())
    }
}

impl From<crate::policy::PolicyError> for EngineError {
    fn from(e: crate::policy::PolicyError) -> Self {
        EngineError::Invalid(e.to_string())
    }
}
