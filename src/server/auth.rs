//! Bearer-token auth: every route needs `Authorization: Bearer <token>` when the server has a
//! token, and the comparison takes the same time whatever the guess.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::api::ApiErrorCode;
use super::{ApiFailure, ServerError, ServerState};

/// The shortest token accepted: shorter ones are guessable.
pub const MIN_TOKEN_CHARS: usize = 16;

/// The server's secret. Only its SHA-256 digest is kept, so comparing with a guess compares
/// two 32-byte digests: the time taken says nothing about the token's length or content.
#[derive(Clone)]
pub struct BearerToken {
    digest: [u8; 32],
}

impl BearerToken {
    /// Checks `token` (surrounding whitespace, such as a token file's newline, is dropped):
    /// at least [`MIN_TOKEN_CHARS`] visible ASCII characters, so it fits in a header.
    pub fn new(token: &str) -> Result<BearerToken, ServerError> {
        let token = token.trim();
        if token.chars().count() < MIN_TOKEN_CHARS {
            return Err(ServerError::InvalidToken(
                "it must be at least 16 characters long; generate one with `openssl rand -hex 32`",
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ServerError::InvalidToken(
                "it may hold only visible ASCII characters (no spaces)",
            ));
        }
        Ok(BearerToken {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Whether `candidate` is the token, in constant time.
    pub fn matches(&self, candidate: &str) -> bool {
        let guess: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        constant_time_eq(&self.digest, &guess)
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Compares every byte whatever the first difference; `black_box` keeps the optimiser from
/// turning the fold back into an early exit.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(difference) == 0
}

/// Middleware: 401 unless the request carries the server's token (when it has one).
pub(crate) async fn require_token(State(state): State<ServerState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.config().token else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_credential);
    match presented {
        Some(candidate) if token.matches(candidate) => next.run(request).await,
        Some(_) => unauthorized(&format!(
            "the bearer token is wrong; use the token the server was started with ({} or --token-file)",
            crate::env_vars::SERVER_TOKEN
        )),
        None => unauthorized("this server needs a bearer token: send the header `Authorization: Bearer <token>`"),
    }
}

fn unauthorized(message: &str) -> Response {
    ApiFailure::new(ApiErrorCode::Unauthorized, message).into_response()
}

/// The credential of an `Authorization: Bearer <credential>` value; the scheme is
/// case-insensitive (RFC 9110).
fn bearer_credential(value: &str) -> Option<&str> {
    let (scheme, credential) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credential.trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_themselves() {
        let token = BearerToken::new("  correct-horse-battery-staple\n").expect("a valid token");
        assert!(token.matches("correct-horse-battery-staple"));
        assert!(!token.matches("correct-horse-battery-stapl"));
        assert!(!token.matches(""));
        assert!(format!("{token:?}").contains("redacted"));
    }

    #[test]
    fn weak_or_unsendable_tokens_are_refused() {
        assert!(BearerToken::new("short").is_err());
        assert!(BearerToken::new("has a space in the middle of it").is_err());
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_credential("Bearer abc"), Some("abc"));
        assert_eq!(bearer_credential("bearer  abc"), Some("abc"));
        assert_eq!(bearer_credential("Basic abc"), None);
        assert_eq!(bearer_credential("Bearer"), None);
    }
}
