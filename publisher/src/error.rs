//! Every error the API answers, as `{"error": "...", "details": [...]}`.

use crate::domain::FieldError;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON at all.
    #[error("request body is not valid JSON")]
    BadJson(String),
    /// JSON, but not the expected shape (missing field, wrong type, unknown field).
    #[error("request body has the wrong shape")]
    BadShape(String),
    #[error("request is not valid")]
    Invalid(Vec<FieldError>),
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("{0} not found")]
    NotFound(&'static str),
    /// No token, or one that names no caller.
    #[error("{0}")]
    Unauthenticated(String),
    /// A caller whose role does not cover the request.
    #[error("{0}")]
    Forbidden(String),
    /// The request contradicts an earlier one (an idempotency key reused
    /// with another body).
    #[error("{0}")]
    Conflict(String),
    /// The broker or the database cannot take the request now; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// The caller is past its rate; it may try again after the duration.
    #[error("too many requests for this key; retry after {0:?}")]
    TooManyRequests(std::time::Duration),
    /// The system is too busy to take more; retry after the duration.
    #[error("{0}")]
    Overloaded(String, std::time::Duration),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, details) = match &self {
            ApiError::BadJson(why) => (StatusCode::BAD_REQUEST, json!([{ "message": why }])),
            ApiError::BadShape(why) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!([{ "message": why }]),
            ),
            ApiError::Invalid(fields) => (StatusCode::UNPROCESSABLE_ENTITY, json!(fields)),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, json!([])),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, json!([])),
            ApiError::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, json!([])),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, json!([])),
            ApiError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, json!([])),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, json!([])),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, json!([])),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, json!([])),
            ApiError::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, json!([])),
            ApiError::Overloaded(..) => (StatusCode::SERVICE_UNAVAILABLE, json!([])),
        };
        // Whole seconds, rounded up: a client that waits that long is let in.
        let retry_after = match &self {
            ApiError::TooManyRequests(wait) | ApiError::Overloaded(_, wait) => {
                Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
            }
            ApiError::Unavailable(_) => Some(1),
            _ => None,
        };
        let mut response = (
            status,
            Json(json!({ "error": self.to_string(), "details": details })),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(seconds.max(1)),
            );
        }
        response
    }
}
