//! Error responses the gateway writes itself, as `application/problem+json` (RFC 9457), each
//! carrying the request id so a client's report can be found in the logs.

use bytes::Bytes;
use http::header::HeaderName;
use http::StatusCode;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;
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

    /// Writes the whole response. The connection is not kept alive afterwards when the request
    /// body may still be unread.
    pub async fn send(&self, session: &mut Session, request_id: &str) -> Result<()> {
        let body = self.body(request_id);
        let mut header = ResponseHeader::build(self.status, Some(4))?;
        header.insert_header(http::header::CONTENT_TYPE, "application/problem+json")?;
        header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        header.insert_header(REQUEST_ID, request_id)?;
        for (name, value) in &self.headers {
            header.insert_header(name.clone(), value.as_str())?;
        }
        if !session.is_body_done() {
            session.set_keepalive(None);
        }
        // A failed write means the client went away: a downstream error, logged as routine.
        session
            .write_response_header(Box::new(header), false)
            .await
            .map_err(pingora::Error::into_down)?;
        session
            .write_response_body(Some(body), true)
            .await
            .map_err(pingora::Error::into_down)
    }
}
