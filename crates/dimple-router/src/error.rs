//! The router's errors and their one mapping to status codes (gRPC, and HTTP through it).

use dimple_core::params::ParamError;
use dimple_proto::convert::ConvertError;

use crate::prompt::PromptError;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Params(#[from] ParamError),
    /// A field that can never be served as given; the message names it and the limit.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("no workers are available")]
    NoWorkers,
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("the request's deadline passed ({0})")]
    Deadline(String),
    #[error("the request was cancelled")]
    Cancelled,
    /// A worker's final answer, passed on unchanged (for example INVALID_ARGUMENT).
    #[error("{}", .0.message())]
    Worker(tonic::Status),
    #[error("internal: {0}")]
    Internal(String),
    #[error("cannot set up the server: {0}")]
    Setup(String),
}

impl RouterError {
    /// The one mapping from errors to status codes; gRPC answers with it directly and the
    /// HTTP API through [`http_status`].
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            RouterError::Convert(_) => Code::InvalidArgument,
            RouterError::Prompt(p) => match p {
                PromptError::EmptyConversation
                | PromptError::ImageCountMismatch { .. }
                | PromptError::EmptyImage { .. }
                | PromptError::PromptTooLong { .. }
                | PromptError::Tokenize { .. }
                | PromptError::UnknownTokenId { .. }
                | PromptError::RenderTemplate { .. }
                | PromptError::MissingSpecialToken { .. } => Code::InvalidArgument,
                PromptError::LoadTokenizer { .. }
                | PromptError::ReadFile { .. }
                | PromptError::ParseJson { .. }
                | PromptError::BadChatTemplateField { .. }
                | PromptError::CompileTemplate { .. }
                | PromptError::Decode { .. } => Code::Internal,
            },
            RouterError::Params(_) | RouterError::Invalid(_) => Code::InvalidArgument,
            RouterError::Unauthenticated(_) => Code::Unauthenticated,
            RouterError::NoWorkers | RouterError::Unavailable(_) => Code::Unavailable,
            RouterError::Exhausted(_) => Code::ResourceExhausted,
            RouterError::Deadline(_) => Code::DeadlineExceeded,
            RouterError::Cancelled => Code::Cancelled,
            RouterError::Worker(s) => s.code(),
            RouterError::Internal(_) | RouterError::Setup(_) => Code::Internal,
        }
    }
}

impl From<RouterError> for tonic::Status {
    fn from(e: RouterError) -> Self {
        match e {
            RouterError::Worker(s) => s,
            e => tonic::Status::new(e.code(), e.to_string()),
        }
    }
}

/// The HTTP status of a gRPC code (the HTTP API answers errors with it).
pub fn http_status(code: tonic::Code) -> u16 {
    use tonic::Code;
    match code {
        Code::Ok => 200,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::ResourceExhausted => 429,
        // The client went away; nobody reads this (nginx's "client closed request").
        Code::Cancelled => 499,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
        _ => 500,
    }
}

/// The canonical spelling of a code (`INVALID_ARGUMENT`), as in the gRPC specification.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let s: tonic::Status = RouterError::NoWorkers.into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        let s: tonic::Status = RouterError::Exhausted("every worker's queue is full".into()).into();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        let s: tonic::Status = PromptError::PromptTooLong {
            tokens: 9,
            max_prompt_tokens: 8,
        }
        .into_status();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().contains("max_prompt_tokens"), "{}", s.message());
        assert_eq!(http_status(tonic::Code::InvalidArgument), 400);
        assert_eq!(http_status(tonic::Code::Unauthenticated), 401);
        assert_eq!(http_status(tonic::Code::ResourceExhausted), 429);
        assert_eq!(http_status(tonic::Code::Unavailable), 503);
        assert_eq!(http_status(tonic::Code::DeadlineExceeded), 504);
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        let s: tonic::Status =
            RouterError::Worker(tonic::Status::invalid_argument("`images[0]`: bad")).into();
        assert_eq!(
            (s.code(), s.message()),
            (tonic::Code::InvalidArgument, "`images[0]`: bad")
        );
    }

    trait IntoStatus {
        fn into_status(self) -> tonic::Status;
    }

    impl IntoStatus for PromptError {
        fn into_status(self) -> tonic::Status {
            RouterError::from(self).into()
        }
    }
}
