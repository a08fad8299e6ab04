//! Reply bodies and the stable error codes.
//!
//! Every reply is a JSON body, `{"ok": …}` or `{"error": {"code", "message", "details",
//! "retry_after_ms"}}`. An error reply also carries the NATS services API headers
//! `Nats-Service-Error-Code` (the HTTP-like status of the code) and `Nats-Service-Error` (the
//! message), so generic NATS tooling sees the failure too. [`ReplyParts`] builds both; the
//! services API's own error path sends an empty body, so Toka never relies on it alone.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Header with the numeric error status (NATS services API).
pub const ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";
/// Header with the error message (NATS services API).
pub const ERROR_HEADER: &str = "Nats-Service-Error";

/// A stable error code. Clients match on these; they never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or fails its schema; `details` names the schema and pointer.
    BadRequest,
    /// No valid credential: missing, malformed, badly signed, expired or revoked token.
    Unauthorized,
    /// The credential is valid but does not allow this action on this resource.
    Forbidden,
    /// The named entity does not exist.
    NotFound,
    /// The request conflicts with the current state (a taken sequence, a wrong transition).
    Conflict,
    /// The request exceeds a size limit.
    TooLarge,
    /// Too many requests; retry after `retry_after_ms`.
    RateLimited,
    /// The service cannot take the request now (overloaded, recovering, a dependency down);
    /// retry after `retry_after_ms` when given.
    Unavailable,
    /// A fault inside the service; the request may or may not have taken effect only where
    /// the endpoint documents idempotency.
    Internal,
}

impl ErrorCode {
    /// Every code, in the table's order.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The status sent in `Nats-Service-Error-Code` (HTTP's numbering).
    pub const fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{code}: {message}")]
pub struct WireError {
    /// The stable code.
    pub code: ErrorCode,
    /// What went wrong, for humans.
    pub message: String,
    /// Machine-readable specifics (the schema and pointer of a validation failure, the
    /// expected sequence of a conflict, ...).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub details: Map<String, Value>,
    /// When retrying may succeed, in milliseconds (rate limited, unavailable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl WireError {
    /// An error with no details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError { code, message: message.into(), details: Map::new(), retry_after_ms: None }
    }

    /// Adds a detail.
    pub fn with_detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// A `too_large` error that names the bound it hit: `details` holds `limit` (the bound's
    /// name: a setting such as `kernel.max_record_bytes`, or `nats.max_payload`), `max` (its
    /// value) and, when known, `size` (what the request came to, in the bound's unit).
    pub fn too_large(message: impl Into<String>, limit: &str, max: u64, size: Option<u64>) -> Self {
        let error = WireError::new(ErrorCode::TooLarge, message).with_detail("limit", limit).with_detail("max", max);
        match size {
            Some(size) => error.with_detail("size", size),
            None => error,
        }
    }

    /// Sets the retry hint.
    pub fn with_retry_after_ms(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }
}

impl From<crate::schema::Error> for WireError {
    fn from(e: crate::schema::Error) -> Self {
        WireError::new(ErrorCode::BadRequest, e.to_string())
            .with_detail("schema", e.schema.clone())
            .with_detail("pointer", e.pointer.clone())
    }
}

/// A reply body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Reply<T> {
    /// Success.
    Ok(T),
    /// Failure.
    Error(WireError),
}

impl<T> Reply<T> {
    /// The reply as a `Result`.
    pub fn into_result(self) -> Result<T, WireError> {
        match self {
            Reply::Ok(t) => Ok(t),
            Reply::Error(e) => Err(e),
        }
    }
}

impl<T> From<Result<T, WireError>> for Reply<T> {
    fn from(r: Result<T, WireError>) -> Self {
        match r {
            Ok(t) => Reply::Ok(t),
            Err(e) => Reply::Error(e),
        }
    }
}

/// The body of an error reply, `{"error": …}`: a [`Reply`] that cannot be a success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// The error.
    pub error: WireError,
}

/// A reply ready for the bus: headers and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyParts {
    /// Headers to set (empty on success).
    pub headers: Vec<(&'static str, String)>,
    /// The JSON body.
    pub body: Vec<u8>,
}

impl ReplyParts {
    /// The parts of `reply`. A success body that fails to serialize becomes an `internal` error.
    pub fn of<T: Serialize>(reply: &Reply<T>) -> Self {
        match reply {
            Reply::Ok(_) => match serde_json::to_vec(reply) {
                Ok(body) => ReplyParts { headers: Vec::new(), body },
                Err(e) => Self::error(&WireError::new(ErrorCode::Internal, format!("reply does not serialize: {e}"))),
            },
            Reply::Error(e) => Self::error(e),
        }
    }

    /// The parts of an error reply.
    pub fn error(e: &WireError) -> Self {
        // An error body holds only strings, integers and a JSON map: it always serializes.
        let body = serde_json::to_vec(&ErrorBody { error: e.clone() }).unwrap_or_default();
        // Header values may not hold line breaks.
        let message: String = e.message.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        ReplyParts { headers: vec![(ERROR_CODE_HEADER, e.code.status().to_string()), (ERROR_HEADER, message)], body }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reply_has_body_and_headers() {
        let e = WireError::new(ErrorCode::RateLimited, "slow down\nplease").with_retry_after_ms(250);
        let parts = ReplyParts::of(&Reply::<u8>::Error(e));
        assert_eq!(
            parts.headers,
            vec![(ERROR_CODE_HEADER, "429".to_owned()), (ERROR_HEADER, "slow down please".to_owned())]
        );
        let body: Value = serde_json::from_slice(&parts.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"code": "rate_limited", "message": "slow down\nplease", "retry_after_ms": 250}})
        );
    }

    #[test]
    fn ok_reply_has_no_headers() {
        let parts = ReplyParts::of(&Reply::Ok(serde_json::json!({"seq": 3})));
        assert!(parts.headers.is_empty());
        assert_eq!(parts.body, br#"{"ok":{"seq":3}}"#);
    }

    #[test]
    fn codes_are_distinct() {
        let mut names: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        let mut statuses: Vec<_> = ErrorCode::ALL.iter().map(|c| c.status()).collect();
        names.sort_unstable();
        names.dedup();
        statuses.sort_unstable();
        statuses.dedup();
        assert_eq!((names.len(), statuses.len()), (9, 9));
        for c in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }
}
