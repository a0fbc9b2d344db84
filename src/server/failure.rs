//! [`ApiFailure`]: a request that failed as a whole, answered with its status and an
//! [`ErrorBody`].

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::api::{ApiError, ApiErrorCode, ErrorBody};

/// A failed request: a code (which fixes the HTTP status) and a message that says what to do.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiFailure {
    /// The machine-readable code.
    pub code: ApiErrorCode,
    /// The sentence for people.
    pub message: String,
}

impl ApiFailure {
    /// A failure with `code` and `message`.
    pub fn new(code: ApiErrorCode, message: impl Into<String>) -> Self {
        ApiFailure {
            code,
            message: message.into(),
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiFailure::new(ApiErrorCode::BadRequest, message)
    }

    /// 503: the server cannot take the request now; retrying later may work.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiFailure::new(ApiErrorCode::Unavailable, message)
    }

    /// 500: the server failed. The details go to the log, in the request's span; the client
    /// gets `what` only, so no host path or internal error leaks.
    pub fn internal(what: &str, error: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %crate::error_text::error_chain(error), "{what}");
        ApiFailure::new(
            ApiErrorCode::Internal,
            format!("{what}; the details are in the server's log"),
        )
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let code = self.code;
        let mut response = (
            status,
            Json(ErrorBody {
                error: ApiError {
                    code,
                    message: self.message,
                },
            }),
        )
            .into_response();
        let headers = response.headers_mut();
        match code {
            ApiErrorCode::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiErrorCode::Unavailable => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}
