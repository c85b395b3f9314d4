//! Every error the gateway itself produces: one JSON envelope, one stable code.
//!
//! `{"error": {"code", "message", "request_id", "retryable"}}`. 5xx messages are fixed
//! strings chosen here; the internal cause is logged, never sent.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::Body;

/// The stable error codes; `docs/errors.md` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    InvalidPath,
    InvalidConfig,
    Unauthorized,
    ExpiredToken,
    /// A browser session ended (refresh refused or impossible).
    SessionExpired,
    Forbidden,
    CsrfRejected,
    /// A session-authenticated WebSocket from an origin that is not allowed.
    OriginRejected,
    InsufficientScope,
    UpstreamForbidden,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    UpgradeRequired,
    QuotaExceeded,
    RateLimited,
    UpstreamUnavailable,
    UpstreamTimeout,
    UpstreamOverloaded,
    /// The OpenID Connect provider failed a login (exchange, ID token, discovery).
    IdpError,
    LoopDetected,
    /// A request does not match its operation in the route's OpenAPI document.
    ValidationFailed,
    /// A pipeline step failed (its own status, or 502/504 when it did not answer).
    StepFailed,
    /// A parallel pipeline had a failing step.
    PipelineFailed,
    ServiceUnavailable,
    InternalError,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 28] = [
        ErrorCode::BadRequest,
        ErrorCode::InvalidPath,
        ErrorCode::InvalidConfig,
        ErrorCode::Unauthorized,
        ErrorCode::ExpiredToken,
        ErrorCode::SessionExpired,
        ErrorCode::Forbidden,
        ErrorCode::CsrfRejected,
        ErrorCode::OriginRejected,
        ErrorCode::InsufficientScope,
        ErrorCode::UpstreamForbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::PayloadTooLarge,
        ErrorCode::RequestTimeout,
        ErrorCode::UpgradeRequired,
        ErrorCode::QuotaExceeded,
        ErrorCode::RateLimited,
        ErrorCode::UpstreamUnavailable,
        ErrorCode::UpstreamTimeout,
        ErrorCode::UpstreamOverloaded,
        ErrorCode::LoopDetected,
        ErrorCode::IdpError,
        ErrorCode::StepFailed,
        ErrorCode::PipelineFailed,
        ErrorCode::ValidationFailed,
        ErrorCode::ServiceUnavailable,
        ErrorCode::InternalError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::InvalidPath => "INVALID_PATH",
            ErrorCode::InvalidConfig => "INVALID_CONFIG",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::ExpiredToken => "EXPIRED_TOKEN",
            ErrorCode::SessionExpired => "SESSION_EXPIRED",
            ErrorCode::InsufficientScope => "INSUFFICIENT_SCOPE",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::CsrfRejected => "CSRF_REJECTED",
            ErrorCode::OriginRejected => "ORIGIN_REJECTED",
            ErrorCode::UpstreamForbidden => "UPSTREAM_FORBIDDEN",
            ErrorCode::LoopDetected => "LOOP_DETECTED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::RequestTimeout => "REQUEST_TIMEOUT",
            ErrorCode::UpgradeRequired => "UPGRADE_REQUIRED",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
            ErrorCode::UpstreamTimeout => "UPSTREAM_TIMEOUT",
            ErrorCode::UpstreamOverloaded => "UPSTREAM_OVERLOADED",
            ErrorCode::IdpError => "IDP_ERROR",
            ErrorCode::StepFailed => "STEP_FAILED",
            ErrorCode::PipelineFailed => "PIPELINE_FAILED",
            ErrorCode::ValidationFailed => "VALIDATION_FAILED",
            ErrorCode::ServiceUnavailable => "SERVICE_UNAVAILABLE",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::InvalidPath
            | ErrorCode::InvalidConfig
            | ErrorCode::ValidationFailed => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized | ErrorCode::ExpiredToken | ErrorCode::SessionExpired => {
                StatusCode::UNAUTHORIZED
            }
            ErrorCode::Forbidden
            | ErrorCode::CsrfRejected
            | ErrorCode::OriginRejected
            | ErrorCode::InsufficientScope
            | ErrorCode::UpstreamForbidden => StatusCode::FORBIDDEN,
            ErrorCode::LoopDetected => StatusCode::LOOP_DETECTED,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            ErrorCode::QuotaExceeded | ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::UpstreamUnavailable
            | ErrorCode::IdpError
            | ErrorCode::StepFailed
            | ErrorCode::PipelineFailed => StatusCode::BAD_GATEWAY,
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::ServiceUnavailable | ErrorCode::UpstreamOverloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the same request may succeed if sent again unchanged.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::UpstreamUnavailable
                | ErrorCode::UpstreamTimeout
                | ErrorCode::ServiceUnavailable
                | ErrorCode::UpstreamOverloaded
                | ErrorCode::QuotaExceeded
                | ErrorCode::RateLimited
        )
    }

    /// The only message a client sees for a 5xx of this code.
    fn server_message(self) -> &'static str {
        match self {
            ErrorCode::UpstreamUnavailable => "the upstream service is unavailable",
            ErrorCode::UpstreamTimeout => "the upstream service did not answer in time",
            ErrorCode::UpstreamOverloaded => "the upstream service is overloaded",
            ErrorCode::IdpError => "the identity provider could not complete the login",
            ErrorCode::ServiceUnavailable => {
                "the gateway or a service it depends on is not available"
            }
            ErrorCode::LoopDetected => "the request has already passed through this gateway",
            _ => "internal error",
        }
    }
}

/// An error response about to be sent.
#[derive(Debug)]
pub struct GatewayError {
    pub code: ErrorCode,
    message: String,
    headers: Vec<(header::HeaderName, HeaderValue)>,
    /// Itemised problems (`INVALID_CONFIG`: one line per config error).
    details: Vec<serde_json::Value>,
    /// A body in another program's shape (FnKit's pipeline errors) and its status.
    compat: Option<Box<(StatusCode, serde_json::Map<String, serde_json::Value>)>>,
    /// A status other than the code's (an authorization service's own refusal).
    status: Option<StatusCode>,
}

impl GatewayError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        GatewayError {
            code,
            message: message.into(),
            headers: Vec::new(),
            details: Vec::new(),
            compat: None,
            status: None,
        }
    }

    /// Answers with `status` instead of the code's own (the envelope is unchanged).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    /// An error whose body keeps another program's shape, so its clients keep
    /// working (FnKit: `{"error": "Step failed", "step", "status", "body"}`); the
    /// envelope's `code` and `request_id` are added to it.
    pub fn compat(
        code: ErrorCode,
        status: StatusCode,
        body: serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        let mut e = Self::new(code, code.server_message());
        e.compat = Some(Box::new((status, body)));
        e
    }

    /// A 5xx with its fixed public message.
    pub fn server(code: ErrorCode) -> Self {
        Self::new(code, code.server_message())
    }

    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn with_details(mut self, details: Vec<String>) -> Self {
        self.details = details.into_iter().map(serde_json::Value::String).collect();
        self
    }

    /// Itemised problems as objects (`VALIDATION_FAILED`: location, pointer, message).
    pub fn with_problems(mut self, problems: Vec<serde_json::Value>) -> Self {
        self.details = problems;
        self
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn into_response(self, request_id: &str) -> Response<Body> {
        if let Some(compat) = self.compat {
            let (status, mut body) = *compat;
            body.insert("code".into(), self.code.as_str().into());
            body.insert("request_id".into(), request_id.into());
            let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
            bytes.push(b'\n');
            return finish(status, bytes, self.headers);
        }
        let mut body = serde_json::json!({
            "error": {
                "code": self.code.as_str(),
                "message": self.message,
                "request_id": request_id,
                "retryable": self.code.retryable(),
            }
        });
        if !self.details.is_empty() {
            body["error"]["details"] = serde_json::json!(self.details);
        }
        let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
        bytes.push(b'\n');
        finish(
            self.status.unwrap_or_else(|| self.code.status()),
            bytes,
            self.headers,
        )
    }
}

fn finish(
    status: StatusCode,
    bytes: Vec<u8>,
    headers: Vec<(header::HeaderName, HeaderValue)>,
) -> Response<Body> {
    let mut res = Response::new(Body::full(Bytes::from(bytes)));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for (name, value) in headers {
        h.append(name, value);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/errors.md is the contract: every code must be listed there.
    #[test]
    fn every_code_is_documented() {
        let docs = include_str!("../../../docs/errors.md");
        for code in ErrorCode::ALL {
            let row = format!("| {} | `{}` |", code.status().as_u16(), code.as_str());
            assert!(docs.contains(&row), "docs/errors.md lacks the row {row}");
        }
    }
}
