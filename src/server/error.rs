//! API errors and their HTTP mapping, in one place; the decision path's errors
//! ([`DecideError`]) map to API errors here, and to gRPC statuses here too.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header};

use crate::decide::DecideError;
use crate::engine::RequestError;

/// Every way a request can fail before (or instead of) a decision.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a missing or mistyped field: names the field.
    #[error("{message}")]
    BadRequest {
        field: Option<String>,
        message: String,
    },
    #[error("request body over the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("no route for `{path}`")]
    NotFound { path: String },
    #[error("method `{method}` not allowed here; allowed: {allow}")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("no policy snapshot loaded yet")]
    NotReady,
    #[error("usage store unavailable: {0}")]
    Unavailable(String),
    /// The first request with this idempotency key has not finished.
    #[error("{0}")]
    InFlight(String),
    /// An idempotency key reused for a different request.
    #[error("{0}")]
    KeyReused(String),
    /// The idempotency key table is full: a new key is refused, nothing counted.
    #[error("{0}")]
    KeysFull(String),
    #[error("no open reservation `{0}`: it was committed, released or expired, or never existed")]
    UnknownReservation(String),
    /// Customer writes are off here, and why.
    #[error("customer writes are disabled: {0}")]
    WritesDisabled(String),
    /// A write without a valid admin token.
    #[error("{0}")]
    Unauthorized(String),
    /// A customer record with problems, each by field path; nothing was changed.
    #[error("the customer record has {} problem(s); nothing was changed", .0.len())]
    InvalidRecord(Vec<crate::live::record::Problem>),
    #[error("no customer `{0}`")]
    UnknownCustomer(String),
    /// A forget of an id with no API record: the files' record (if any) already serves.
    #[error(
        "customer `{0}` has no record written through the API; the policy files' record, if any, is the one served"
    )]
    NoApiRecord(String),
    /// The request asks for a write this node has not applied yet.
    #[error(
        "revision {wanted} is not applied here yet (applied: {applied}); retry, or ask the node that took the write"
    )]
    Stale { wanted: u64, applied: u64 },
    /// Concurrent writes to one customer kept changing the record being extended.
    #[error("{0}")]
    Conflict(String),
}

impl From<crate::usage::StoreError> for ApiError {
    fn from(e: crate::usage::StoreError) -> Self {
        use crate::usage::StoreError as S;
        match e {
            S::InFlight(_) => ApiError::InFlight(e.to_string()),
            S::KeyReused(_) => ApiError::KeyReused(e.to_string()),
            S::KeysFull(_) => ApiError::KeysFull(e.to_string()),
            S::Unavailable(_) | S::Fatal(_) => {
                crate::metrics::store_error();
                ApiError::Unavailable(e.to_string())
            }
        }
    }
}

impl ApiError {
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            field: Some(field.to_string()),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotReady | ApiError::Unavailable(_) | ApiError::KeysFull(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::InFlight(_) => StatusCode::CONFLICT,
            ApiError::KeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::UnknownReservation(_) => StatusCode::NOT_FOUND,
            ApiError::WritesDisabled(_) => StatusCode::FORBIDDEN,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::InvalidRecord(_) => StatusCode::BAD_REQUEST,
            ApiError::UnknownCustomer(_) | ApiError::NoApiRecord(_) => StatusCode::NOT_FOUND,
            ApiError::Stale { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "bad_request",
            ApiError::TooLarge { .. } => "payload_too_large",
            ApiError::BodyTimeout(_) => "request_timeout",
            ApiError::NotFound { .. } => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::NotReady => "not_ready",
            ApiError::Unavailable(_) => "store_unavailable",
            ApiError::InFlight(_) => "idempotency_key_in_flight",
            ApiError::KeyReused(_) => "idempotency_key_reused",
            ApiError::KeysFull(_) => "idempotency_keys_full",
            ApiError::UnknownReservation(_) => "unknown_reservation",
            ApiError::WritesDisabled(_) => "writes_disabled",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::InvalidRecord(_) => "bad_request",
            ApiError::UnknownCustomer(_) => "unknown_customer",
            ApiError::NoApiRecord(_) => "no_api_record",
            ApiError::Stale { .. } => "stale",
            ApiError::Conflict(_) => "conflict",
        }
    }

    /// The JSON error object: `{"code": .., "message": .., "field": ..}`.
    pub fn body(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "code": self.code(), "message": self.to_string() });
        match self {
            ApiError::BadRequest { field: Some(f), .. } => {
                v["field"] = serde_json::Value::String(f.clone());
            }
            ApiError::InFlight(_) | ApiError::KeyReused(_) | ApiError::KeysFull(_) => {
                v["field"] = "idempotency_key".into();
            }
            ApiError::UnknownReservation(_) => v["field"] = "reservation".into(),
            ApiError::InvalidRecord(problems) => {
                if let Some(p) = problems.first() {
                    v["field"] = p.field.clone().into();
                }
                v["problems"] = serde_json::to_value(problems).unwrap_or_default();
            }
            ApiError::UnknownCustomer(_) | ApiError::NoApiRecord(_) => v["field"] = "id".into(),
            ApiError::Stale { applied, .. } => {
                v["field"] = "min_revision".into();
                v["applied_revision"] = (*applied).into();
            }
            _ => {}
        }
        v
    }

    pub fn response(&self) -> Response<Full<Bytes>> {
        let body =
            serde_json::to_vec(&serde_json::json!({ "error": self.body() })).unwrap_or_default();
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = self.status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        if let ApiError::BodyTimeout(_) = self {
            // The rest of the body may still come: this connection cannot be reused.
            r.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        if let ApiError::Unauthorized(_) = self {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        if let ApiError::MethodNotAllowed { allow, .. } = self {
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(allow));
        }
        r
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let field = match e {
            RequestError::WrongKind { .. } => "feature",
            RequestError::ZeroAmount => "amount",
            RequestError::MissingHolder => "holder",
            RequestError::AtNotAllowed => "at",
        };
        ApiError::field(field, e.to_string())
    }
}

impl From<DecideError> for ApiError {
    fn from(e: DecideError) -> Self {
        match e {
            DecideError::NotReady => ApiError::NotReady,
            DecideError::Request(e) => e.into(),
            DecideError::Store(e) => e.into(),
        }
    }
}

/// The gRPC services answer any failure to decide (no snapshot yet, the store
/// unavailable) `UNAVAILABLE`, with the message the HTTP API gives.
impl From<DecideError> for tonic::Status {
    fn from(e: DecideError) -> Self {
        tonic::Status::unavailable(ApiError::from(e).to_string())
    }
}
