//! Why a worker call failed, on the wire: a status whose cause the router must tell apart
//! from an ordinary unreachable or overloaded worker.
//!
//! When a worker's engine fails (a model error or a panic), every request it held ends with
//! UNAVAILABLE carrying `dimple-failure: engine-failed` in its trailers. Any of those
//! requests may be the one that broke the engine (a "query of death"), so the router retries
//! such a request at most once instead of walking it through every worker.

/// The trailer naming the cause of a failed worker call.
pub const FAILURE_METADATA: &str = "dimple-failure";
/// Its value when the worker's engine failed while holding the request.
pub const ENGINE_FAILED: &str = "engine-failed";

/// UNAVAILABLE marked as an engine failure.
pub fn engine_failed_status(message: impl Into<String>) -> tonic::Status {
    let mut s = tonic::Status::unavailable(message);
    s.metadata_mut().insert(
        FAILURE_METADATA,
        tonic::metadata::MetadataValue::from_static(ENGINE_FAILED),
    );
    s
}

/// Whether `status` says the worker's engine failed while holding the request.
pub fn is_engine_failed(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && status
            .metadata()
            .get(FAILURE_METADATA)
            .is_some_and(|v| v.as_bytes() == ENGINE_FAILED.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_failures_are_told_apart() {
        assert!(is_engine_failed(&engine_failed_status(
            "the engine failed: x"
        )));
        assert!(!is_engine_failed(&tonic::Status::unavailable("draining")));
        let mut other = tonic::Status::internal("x");
        other
            .metadata_mut()
            .insert(FAILURE_METADATA, ENGINE_FAILED.parse().unwrap());
        assert!(
            !is_engine_failed(&other),
            "only UNAVAILABLE carries the cause"
        );
    }
}
