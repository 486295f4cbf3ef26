//! Why a request could not be served, in classes that map to HTTP statuses
//! and tell the forwarder whether another target may be tried.

/// A failure to serve a request before its response started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    /// The request itself is wrong (malformed JSON, missing model).
    #[error("{0}")]
    BadRequest(String),
    /// No backend on this node knows the model.
    #[error("model '{0}' is not available on this node")]
    ModelNotFound(String),
    /// The backend could not be reached (connection refused or reset).
    #[error("backend unreachable: {0}")]
    BackendUnreachable(String),
    /// The backend is known to be down or not ready to serve.
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
    /// The backend did not answer in time.
    #[error("backend timed out: {0}")]
    Timeout(String),
    /// This backend kind cannot serve this API.
    #[error("{0}")]
    Unsupported(String),
    /// Every node that could serve the model is busy and the entry node's
    /// queue is full.
    #[error("{0}")]
    Overloaded(String),
    /// Every node is busy and the expected wait exceeds the overflow limit.
    #[error("{0}")]
    Saturated(String),
    /// Every node that serves the model is drained (or removed) by an
    /// operator: no use retrying until one is undrained.
    #[error("{0}")]
    Drained(String),
    /// No node of the mesh serves the model at all.
    #[error("{0}")]
    NotServed(String),
    /// Only the cloud could serve it, and the request's policy forbids it.
    #[error("{0}")]
    CloudNotAllowed(String),
    /// Anything else; a bug or an unexpected state.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    /// The HTTP status a client should see for this error.
    pub fn status(&self) -> u16 {
        match self {
            ServeError::BadRequest(_) => 400,
            ServeError::ModelNotFound(_) => 404,
            ServeError::Unsupported(_) => 501,
            ServeError::BackendUnreachable(_) => 502,
            ServeError::BackendUnavailable(_) => 503,
            ServeError::Timeout(_) => 504,
            ServeError::Overloaded(_) => 429,
            ServeError::Saturated(_) => 503,
            ServeError::Drained(_) => 503,
            ServeError::NotServed(_) => 404,
            ServeError::CloudNotAllowed(_) => 403,
            ServeError::Internal(_) => 500,
        }
    }

    /// A short machine-readable code for the OpenAI error body.
    pub fn code(&self) -> &'static str {
        match self {
            ServeError::BadRequest(_) => "invalid_request",
            ServeError::ModelNotFound(_) => "model_not_found",
            ServeError::Unsupported(_) => "unsupported",
            ServeError::BackendUnreachable(_) => "backend_unreachable",
            ServeError::BackendUnavailable(_) => "backend_unavailable",
            ServeError::Timeout(_) => "backend_timeout",
            ServeError::Overloaded(_) => "mesh_overloaded",
            ServeError::Saturated(_) => "mesh_saturated",
            ServeError::Drained(_) => "model_drained",
            ServeError::NotServed(_) => "model_not_found",
            ServeError::CloudNotAllowed(_) => "cloud_not_allowed",
            ServeError::Internal(_) => "internal_error",
        }
    }

    /// Rebuilds an error a peer reported with [`ServeError::code`].
    pub fn from_code(code: &str, message: String) -> ServeError {
        match code {
            "invalid_request" => ServeError::BadRequest(message),
            "model_not_found" => ServeError::ModelNotFound(message),
            "unsupported" => ServeError::Unsupported(message),
            "backend_unreachable" => ServeError::BackendUnreachable(message),
            "backend_unavailable" => ServeError::BackendUnavailable(message),
            "backend_timeout" => ServeError::Timeout(message),
            "mesh_overloaded" => ServeError::Overloaded(message),
            "mesh_saturated" => ServeError::Saturated(message),
            "model_drained" => ServeError::Drained(message),
            "cloud_not_allowed" => ServeError::CloudNotAllowed(message),
            _ => ServeError::Internal(message),
        }
    }

    /// The message without the class prefix that `Display` adds.
    pub fn message(&self) -> &str {
        match self {
            ServeError::BadRequest(m)
            | ServeError::ModelNotFound(m)
            | ServeError::BackendUnreachable(m)
            | ServeError::BackendUnavailable(m)
            | ServeError::Timeout(m)
            | ServeError::Unsupported(m)
            | ServeError::Overloaded(m)
            | ServeError::Saturated(m)
            | ServeError::Drained(m)
            | ServeError::NotServed(m)
            | ServeError::CloudNotAllowed(m)
            | ServeError::Internal(m) => m,
        }
    }

    /// Whether another target could succeed where this one failed: only
    /// failures of the target itself, never failures of the request.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ServeError::BackendUnreachable(_) | ServeError::BackendUnavailable(_) | ServeError::Timeout(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_the_documented_mapping() {
        assert_eq!(ServeError::BadRequest("x".into()).status(), 400);
        assert_eq!(ServeError::ModelNotFound("m".into()).status(), 404);
        assert_eq!(ServeError::BackendUnreachable("x".into()).status(), 502);
        assert_eq!(ServeError::BackendUnavailable("x".into()).status(), 503);
        assert_eq!(ServeError::Timeout("x".into()).status(), 504);
    }

    #[test]
    fn codes_round_trip() {
        for err in [
            ServeError::BadRequest("a".into()),
            ServeError::ModelNotFound("b".into()),
            ServeError::BackendUnreachable("c".into()),
            ServeError::BackendUnavailable("d".into()),
            ServeError::Timeout("e".into()),
            ServeError::Unsupported("f".into()),
            ServeError::Overloaded("h".into()),
            ServeError::Saturated("i".into()),
            ServeError::CloudNotAllowed("j".into()),
            ServeError::Internal("g".into()),
        ] {
            assert_eq!(ServeError::from_code(err.code(), err.message().to_string()), err);
        }
    }

    #[test]
    fn only_target_failures_are_retryable() {
        assert!(ServeError::Timeout("x".into()).is_retryable());
        assert!(!ServeError::BadRequest("x".into()).is_retryable());
        assert!(!ServeError::ModelNotFound("m".into()).is_retryable());
    }
}
