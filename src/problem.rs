//! Error responses the gateway writes itself, as `application/problem+json` (RFC 9457), each
//! carrying the request id so a client's report can be found in the logs.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use serde_json::json;

use crate::header_rules::REQUEST_ID;

/// A problem to report to the client.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: u16,
    /// What went wrong and, where the client can act, what to do.
    pub detail: String,
    /// Extra response headers, such as a `WWW-Authenticate` challenge.
    pub headers: Vec<(HeaderName, String)>,
}

impl Problem {
    pub fn new(status: u16, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            detail: detail.into(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: HeaderName, value: impl Into<String>) -> Problem {
        self.headers.push((name, value.into()));
        self
    }

    /// The JSON body.
    pub fn body(&self, request_id: &str) -> Bytes {
        let title = StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        let body = json!({
            "type": "about:blank",
            "title": title,
            "status": self.status,
            "detail": self.detail,
            "request_id": request_id,
        });
        Bytes::from(serde_json::to_vec(&body).expect("JSON values serialize"))
    }

    /// The whole response: problem+json, never stored, with the request id.
    pub fn into_response(self, request_id: &str) -> http::Response<Bytes> {
        let body = self.body(request_id);
        let mut response = http::Response::new(Bytes::new());
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        if let Ok(id) = HeaderValue::from_str(request_id) {
            headers.insert(REQUEST_ID, id);
        }
        for (name, value) in self.headers {
            if let Ok(value) = HeaderValue::try_from(value) {
                headers.insert(name, value);
            }
        }
        *response.body_mut() = body;
        response
    }
}
