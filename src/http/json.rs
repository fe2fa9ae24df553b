//! Request-body and query extraction that answer in the contract's error shape and name the
//! offending field (`admin.email: invalid type …`), which serde alone does not.

use actix_web::dev::Payload;
use actix_web::error::PayloadError;
use actix_web::{FromRequest, HttpRequest, http::header, web};
use futures_util::future::LocalBoxFuture;
use serde::de::DeserializeOwned;

use super::ApiError;

/// A JSON body, parsed into `T` (which should `deny_unknown_fields`).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for JsonBody<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|ct| {
                let ct = ct.to_ascii_lowercase();
                ct.starts_with("application/json") || ct.contains("+json")
            });
        // Only for the error message: the limit itself is enforced by `web::PayloadConfig`.
        let limit = req
            .app_data::<BodyLimit>()
            .map_or(BodyLimit::DEFAULT, |l| l.0);
        let body = web::Bytes::from_request(req, payload);
        Box::pin(async move {
            if !is_json {
                return Err(ApiError::UnsupportedMediaType);
            }
            let bytes = body.await.map_err(|e| match e.as_error::<PayloadError>() {
                Some(PayloadError::Overflow) => ApiError::PayloadTooLarge(limit),
                _ => match e.as_response_error().status_code().as_u16() {
                    413 => ApiError::PayloadTooLarge(limit),
                    _ => ApiError::BadRequest(format!("could not read the body: {e}")),
                },
            })?;
            parse(&bytes).map(JsonBody)
        })
    }
}

/// Parses JSON, telling syntax errors (400) from shape errors (422, with the field path).
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Syntax first, so that `[1,2` is malformed (400) rather than "expected a string" (422).
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize(de) {
        Ok(v) => Ok(v),
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_data() {
                let field = if path == "." { "body".to_owned() } else { path };
                Err(ApiError::validation(
                    field,
                    strip_position(&inner.to_string()),
                ))
            } else {
                Err(ApiError::MalformedJson(inner.to_string()))
            }
        }
    }
}

/// serde_json appends " at line 1 column 17", which says nothing to an API user once the
/// field is named.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// The configured body limit, shared with the extractors through app data.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

impl BodyLimit {
    pub const DEFAULT: usize = 64 * 1024;
}

/// A query string parsed into `T`, with the same error shape as bodies.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for Query<T> {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(
            serde_urlencoded::from_str::<T>(req.query_string())
                .map(Query)
                .map_err(|e| ApiError::validation("query", e.to_string())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        admin: Inner,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        email: String,
    }

    #[test]
    fn syntax_errors_are_malformed_and_shape_errors_name_the_field() {
        assert!(matches!(
            parse::<Outer>(b"{not json"),
            Err(ApiError::MalformedJson(_))
        ));
        assert!(matches!(
            parse::<Outer>(b"[1,2"),
            Err(ApiError::MalformedJson(_))
        ));
        match parse::<Outer>(br#"{"admin": {"email": 5}}"#) {
            Err(ApiError::Validation { field, .. }) => assert_eq!(field, "admin.email"),
            other => panic!("{other:?}"),
        }
        match parse::<Outer>(br#"{"admin": {"email": "a"}, "extra": 1}"#) {
            Err(ApiError::Validation { reason, .. }) => assert!(reason.contains("extra")),
            other => panic!("{other:?}"),
        }
    }
}
