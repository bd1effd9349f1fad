//! The one error type of the HTTP layer. Every failure leaves as the
//! contract's body: `{"error": {"code", "message", "details"}}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::domain::FieldError;
use crate::export::ExportError;
use crate::store::{StoreError, StreamError};
use crate::usage::admin::StatsError;

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not the JSON we take.
    #[error("{0}")]
    MalformedBody(String),
    /// 401: no key, or one we do not know.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the key lacks the role or the account.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such entry or route.
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists, the method does not.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409 with a specific code (`idempotency_conflict`, `already_reversed`).
    #[error("{message}")]
    Conflict {
        /// The error code.
        code: &'static str,
        /// What conflicts and what to do.
        message: String,
        /// Where: a batch entry's `index`, the reversed entry's `id`.
        details: serde_json::Value,
    },
    /// 408: the body did not arrive within the read timeout.
    #[error("{0}")]
    RequestTimeout(String),
    /// 413: too many entries or too many bytes.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 422: well-formed but invalid; one item per problem.
    #[error("{message}")]
    Validation {
        /// The error code (`validation_failed`, `unknown_resource`, `in_future`, `too_late`).
        code: &'static str,
        /// A summary.
        message: String,
        /// Every problem, located.
        errors: Vec<FieldError>,
    },
    /// 429: over a quota or a rate limit.
    #[error("{message}")]
    TooManyRequests {
        /// `quota_exceeded` or `rate_limited`.
        code: &'static str,
        /// What and when to retry.
        message: String,
        /// The check fields for quota_exceeded, in the check answer's order.
        details: Box<RawValue>,
        /// Whole seconds for the Retry-After header.
        retry_after: Option<u64>,
    },
    /// 503: the database cannot be reached.
    #[error("the database is unavailable; retry shortly")]
    Unavailable(#[source] StoreError),
    /// 503: the database is up but cannot answer this yet without risking a
    /// wrong answer (the entries listing behind a write left open); the
    /// writer's identity goes to the log only.
    #[error(
        "a transaction that has written to Tally's database (any table: PostgreSQL does not say which) has \
         been open for more than a few seconds, and this page of the ledger would have to wait for it to \
         end; retry shortly (the server's log names that transaction)"
    )]
    Busy(#[source] StoreError),
    /// 503: a concurrent request deadlocked with this one and the database
    /// cancelled this one; nothing was written.
    #[error(
        "this request and a concurrent one waited on each other, and the database cancelled this one; \
         nothing was written: send it again"
    )]
    Contended(#[source] StoreError),
    /// 500: a total the answer needs is past 64 bits of minor units (valid
    /// entries can get there); an operator corrects the entries.
    #[error(
        "a total this answer needs is past 64 bits of minor units, so it cannot be given exactly; an \
         operator can find and correct the entries (docs/operations.md, \"A total past 64 bits\")"
    )]
    TotalTooLarge(#[source] StoreError),
    /// 500: a bug or an unexpected database error; the cause goes to the log only.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    /// A 422 about one field of a request that is not a list of entries.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::one_field(field, "invalid", message.into())
    }

    /// A 422 about a required field of a request that is not a list of
    /// entries, with the item code `missing` (as an entry's own fields have).
    pub fn missing(field: &'static str, message: impl Into<String>) -> Self {
        Self::one_field(field, "missing", message.into())
    }

    fn one_field(field: &'static str, code: &'static str, message: String) -> Self {
        Self::from_field_errors(vec![FieldError {
            index: 0,
            field,
            code,
            message,
        }])
    }

    /// A 422 from validation problems; the code is the first specific one.
    pub fn from_field_errors(errors: Vec<FieldError>) -> Self {
        Self::validation(errors, false)
    }

    /// A 422 for a batch of entries: as [`ApiError::from_field_errors`], and
    /// the message names the entry its problem is in ("entry 3: …", as a
    /// batch's 409 does), which in a batch of thousands is otherwise found
    /// only in details.errors.
    pub fn from_batch_errors(errors: Vec<FieldError>) -> Self {
        Self::validation(errors, true)
    }

    fn validation(errors: Vec<FieldError>, name_the_entry: bool) -> Self {
        let code = errors
            .iter()
            .map(|e| e.code)
            .find(|c| matches!(*c, "unknown_resource" | "unknown_plan" | "in_future" | "too_late"))
            .unwrap_or("validation_failed");
        // The problem the message names is one the code names, when the
        // code names one: a client reading both reads of the same problem.
        let named = |e: &FieldError| match name_the_entry {
            true => format!("entry {}: {}", e.index, e.message),
            false => e.message.clone(),
        };
        let message = match errors.as_slice() {
            [one] => named(one),
            many => format!(
                "{} problems (details.errors lists each); {}",
                many.len(),
                many.iter()
                    .find(|e| e.code == code)
                    .or(many.first())
                    .map_or_else(String::new, named)
            ),
        };
        Self::Validation { code, message, errors }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::MalformedBody(_) => (StatusCode::BAD_REQUEST, "malformed_body"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            Self::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::Validation { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code),
            Self::TooManyRequests { code, .. } => (StatusCode::TOO_MANY_REQUESTS, code),
            Self::Unavailable(_) | Self::Busy(_) | Self::Contended(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable")
            }
            Self::TotalTooLarge(_) => (StatusCode::INTERNAL_SERVER_ERROR, "total_too_large"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<StatsError> for ApiError {
    /// The admin stats' failure: the store's own error keeps its status (503
    /// when the database is out of reach), anything else is a 500.
    fn from(e: StatsError) -> Self {
        match e {
            StatsError::Store(store)
            | StatsError::Invoices(ExportError::Store(store) | ExportError::Lines(StreamError::Store(store))) => {
                store.into()
            }
            other => Self::Internal(other.into()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => Self::NotFound(m),
            StoreError::IdempotencyConflict { index, .. } => Self::Conflict {
                code: "idempotency_conflict",
                message: e.to_string(),
                details: index.map_or_else(|| json!({}), |index| json!({ "index": index })),
            },
            StoreError::AlreadyReversed(id) => Self::Conflict {
                code: "already_reversed",
                message: e.to_string(),
                details: json!({ "id": id }),
            },
            StoreError::Invalid(m) => Self::invalid("id", m),
            StoreError::Unavailable(_) => Self::Unavailable(e),
            StoreError::Busy(_) => Self::Busy(e),
            StoreError::Contended(_) => Self::Contended(e),
            StoreError::Overflow { .. } => Self::TotalTooLarge(e),
            StoreError::Internal(_) | StoreError::Unexpected(_) => Self::Internal(e.into()),
        }
    }
}

/// The contract's error body, its fields in the contract's order (a
/// `serde_json::Value` would sort them: `details` before `message`).
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorFields<'a>,
}

#[derive(Serialize)]
struct ErrorFields<'a> {
    code: &'a str,
    message: String,
    details: &'a RawValue,
}

#[derive(Serialize)]
struct ValidationDetails<'a> {
    errors: &'a [FieldError],
}

/// `value` as JSON text, in its own field order.
pub(crate) fn raw(value: &impl Serialize) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("an error's details serialise")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            let cause = crate::telemetry::cause_chain(&self);
            tracing::error!(error.code = code, error.cause = %cause, "request failed: {cause}");
        }
        let details = match &self {
            Self::Validation { errors, .. } => raw(&ValidationDetails { errors }),
            Self::TooManyRequests { details, .. } => details.clone(),
            Self::Conflict { details, .. } => raw(details),
            _ => raw(&json!({})),
        };
        let body = ErrorBody {
            error: ErrorFields {
                code,
                message: self.to_string(),
                details: &details,
            },
        };
        let mut response = (status, Json(body)).into_response();
        let retry_after = match &self {
            Self::Unavailable(_) | Self::Busy(_) | Self::Contended(_) => Some(1),
            Self::TooManyRequests { retry_after, .. } => *retry_after,
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            // RFC 7235: a 401 names the scheme it wants.
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
