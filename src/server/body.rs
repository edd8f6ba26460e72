//! A request's body: read whole within `server.body_read_timeout` and
//! `server.max_body_bytes`, typed `application/json`, and a JSON object.
//!
//! The body is read by a middleware before any handler runs, under one deadline for
//! the whole of it: a client that sends a byte a minute is answered 408 and its
//! connection closed, rather than holding a connection (and, later, an admission slot)
//! for as long as it likes. Handlers then see the body in memory.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};

use super::{ApiError, ServerState};

/// Middleware: reads the body into memory, or answers 408 (too slow), 413 (too large)
/// or 400 (broken off).
pub(super) async fn read_body(
    State(state): State<Arc<ServerState>>,
    request: Request,
    next: Next,
) -> Response {
    let config = &state.config;
    let (parts, body) = request.into_parts();
    let limited = Limited::new(body, config.max_body_bytes);
    let bytes = match tokio::time::timeout(config.body_read_timeout, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return too_large(config.max_body_bytes).into_response();
        }
        Ok(Err(e)) => {
            return ApiError::bad_request(format!("cannot read the body: {e}"), None)
                .into_response();
        }
        Err(_) => {
            crate::telemetry::metrics::client_timeout("body");
            tracing::debug!(
                event = "server.body_timeout",
                timeout_ms = config.body_read_timeout.as_millis() as u64,
                "a request's body did not arrive in time; its connection is closed"
            );
            return ApiError::request_timeout(format!(
                "the body did not arrive within {} (server.body_read_timeout); send it at once",
                humantime::format_duration(config.body_read_timeout)
            ))
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn too_large(max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        format!("the request body is larger than {max} bytes (server.max_body_bytes)"),
    )
}

/// The body, once its content type is JSON: `application/json`, with parameters or
/// without (`application/json; charset=utf-8`), in any case. Anything else is 415.
pub(super) fn json_body(headers: &HeaderMap, body: Bytes) -> Result<Bytes, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if content_type.is_some_and(is_json) {
        Ok(body)
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ))
    }
}

/// `application/json`, parameters aside: `application/jsonx` is not JSON.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// Parses a body that must be a JSON object, naming the field in the error.
pub(super) fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // serde reads a struct from an array too (`["x"]` as `{"query": "x"}`): the body's
    // shape is checked first.
    let shape = match body.trim_ascii_start().first() {
        Some(b'{') => None,
        Some(b'[') => Some("an array"),
        Some(b'"') => Some("a string"),
        Some(b'-' | b'0'..=b'9') => Some("a number"),
        Some(b't' | b'f') => Some("a boolean"),
        Some(b'n') => Some("null"),
        Some(_) => Some("not JSON"),
        None => Some("empty"),
    };
    if let Some(shape) = shape {
        return Err(ApiError::bad_request(
            format!(
                "the body must be a JSON object, such as {{\"query\": \"...\"}}; it is {shape}"
            ),
            None,
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        let inner = e.into_inner();
        let message = match &field {
            Some(f) => format!("{f}: {inner}"),
            None => format!("the body is not valid JSON for this endpoint: {inner}"),
        };
        ApiError::bad_request(message, field.as_deref())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_with_parameters_is_json_and_lookalikes_are_not() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON;charset=UTF-8",
            " application/json ",
        ] {
            assert!(is_json(ok), "{ok}");
        }
        for bad in [
            "application/jsonx",
            "application/json-seq",
            "application/x-json",
            "text/json",
            "application/vnd.api+json",
            "",
        ] {
            assert!(!is_json(bad), "{bad}");
        }
    }

    #[test]
    fn only_an_object_is_a_body() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Body {
            query: String,
        }
        assert!(parse::<Body>(b" {\"query\": \"x\"}").is_ok());
        for (body, shape) in [
            (&b"[\"x\"]"[..], "an array"),
            (b"\"x\"", "a string"),
            (b"7", "a number"),
            (b"null", "null"),
            (b"", "empty"),
            (b"query=x", "not JSON"),
        ] {
            let e = parse::<Body>(body).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            assert!(
                format!("{e:?}").contains(&format!("it is {shape}")),
                "{e:?}"
            );
        }
    }
}
