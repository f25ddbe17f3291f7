//! The router's errors and their one mapping to gRPC statuses.

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

impl From<RouterError> for tonic::Status {
    fn from(e: RouterError) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        match e {
            RouterError::Convert(c) => c.into(),
            RouterError::Prompt(p) => match p {
                PromptError::EmptyConversation
                | PromptError::ImageCountMismatch { .. }
                | PromptError::EmptyImage { .. }
                | PromptError::PromptTooLong { .. }
                | PromptError::Tokenize { .. }
                | PromptError::UnknownTokenId { .. }
                | PromptError::RenderTemplate { .. }
                | PromptError::MissingSpecialToken { .. } => Status::invalid_argument(msg),
                PromptError::LoadTokenizer { .. }
                | PromptError::ReadFile { .. }
                | PromptError::ParseJson { .. }
                | PromptError::BadChatTemplateField { .. }
                | PromptError::CompileTemplate { .. }
                | PromptError::Decode { .. } => Status::internal(msg),
            },
            RouterError::Params(_) | RouterError::Invalid(_) => Status::invalid_argument(msg),
            RouterError::NoWorkers | RouterError::Unavailable(_) => Status::unavailable(msg),
            RouterError::Exhausted(_) => Status::resource_exhausted(msg),
            RouterError::Deadline(_) => Status::deadline_exceeded(msg),
            RouterError::Cancelled => Status::cancelled(msg),
            RouterError::Worker(s) => s,
            RouterError::Internal(_) | RouterError::Setup(_) => Status::internal(msg),
        }
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
