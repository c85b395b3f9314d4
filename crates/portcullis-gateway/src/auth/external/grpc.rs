//! gRPC mode of the `external` authenticator: Envoy's
//! `envoy.service.auth.v3.Authorization/Check`, so existing ext_authz servers (OPA's
//! Envoy plugin, Authorino) answer unchanged.
//!
//! The request carries what Envoy's does by default: the source address, and in
//! `attributes.request.http` the id, method, path (with query), host, scheme and a
//! `headers` map (lower-case names, repeated values comma-joined, pseudo-headers
//! `:authority`, `:method`, `:path` included). `status.code == 0` allows (identity
//! from `ok_response.headers`); anything else denies with `denied_response` (403 when
//! it names no status); `error_response`, a gRPC error or a garbled answer is a
//! failure (the failure mode decides).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, StatusCode, Uri};
use prost::Message;

use super::{Decision, Denial, ExternalAuth, RequestView, Unavailable, MAX_ANSWER};
use crate::body::Body;

/// The Check method's URI under the configured base URL.
pub(super) fn check_uri(base: &Uri) -> Option<Uri> {
    let scheme = base.scheme()?.clone();
    let authority = base.authority()?.clone();
    Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query("/envoy.service.auth.v3.Authorization/Check")
        .build()
        .ok()
}

pub(super) async fn check(
    auth: &ExternalAuth,
    uri: &Uri,
    req: &RequestView<'_>,
) -> Result<Decision, Unavailable> {
    let message = check_request(auth, req).encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(message.len()).map_err(|_| Unavailable::Garbled)?);
    framed.put_slice(&message);
    let mut call = Request::new(Body::full(framed.freeze()));
    *call.method_mut() = http::Method::POST;
    *call.uri_mut() = uri.clone();
    let h = call.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    let res = auth.client.request(call).await.map_err(|e| {
        tracing::warn!(error = %crate::action::proxy::error_chain(&e), "authorization service (gRPC) unreachable");
        Unavailable::Down
    })?;
    if res.status() != StatusCode::OK {
        tracing::warn!(
            status = res.status().as_u16(),
            "authorization service (gRPC) answered with an HTTP error"
        );
        return Err(Unavailable::Down);
    }
    let (head, body) = res.into_parts();
    use http_body_util::BodyExt;
    // An answer too large or cut short may have been a refusal: never a pass.
    let collected = http_body_util::Limited::new(body, MAX_ANSWER)
        .collect()
        .await
        .map_err(|_| Unavailable::Garbled)?;
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    // Trailers-only answers carry the status in the head.
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| head.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    if status != Some(0) {
        tracing::warn!(grpc_status = ?status, "authorization service (gRPC) failed the call");
        return Err(Unavailable::Down);
    }
    let answer = unframe(data).ok_or_else(|| {
        tracing::warn!("authorization service (gRPC) sent no valid message");
        Unavailable::Garbled
    })?;
    let answer = CheckResponse::decode(answer).map_err(|e| {
        tracing::warn!(error = %e, "authorization service (gRPC) sent an undecodable CheckResponse");
        Unavailable::Garbled
    })?;
    decide(auth, answer)
}

fn decide(auth: &ExternalAuth, answer: CheckResponse) -> Result<Decision, Unavailable> {
    let code = answer.status.as_ref().map_or(0, |s| s.code);
    match (code, answer.http_response) {
        (_, Some(check_response::HttpResponse::ErrorResponse(_))) => {
            tracing::warn!("authorization service (gRPC) reported an error");
            Err(Unavailable::Down)
        }
        (0, ok) => {
            let headers = match ok {
                Some(check_response::HttpResponse::OkResponse(ok)) => header_map(&ok.headers),
                _ => HeaderMap::new(),
            };
            Ok(auth.allow(|name| headers.get(name)))
        }
        (_, denied) => {
            let denied = match denied {
                Some(check_response::HttpResponse::DeniedResponse(d)) => d,
                _ => DeniedHttpResponse::default(),
            };
            let status = denied
                .status
                .and_then(|s| u16::try_from(s.code).ok())
                .filter(|c| *c > 0)
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::FORBIDDEN);
            let headers = header_map(&denied.headers);
            Ok(Decision::Deny(Denial {
                status,
                content_type: headers.get(header::CONTENT_TYPE).cloned(),
                headers: super::denial_headers(|name| headers.get(name)),
                body: Bytes::from(denied.body),
            }))
        }
    }
}

fn header_map(options: &[HeaderValueOption]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for o in options {
        let Some(h) = &o.header else { continue };
        let value = if h.raw_value.is_empty() {
            HeaderValue::from_str(&h.value).ok()
        } else {
            HeaderValue::from_bytes(&h.raw_value).ok()
        };
        if let (Ok(name), Some(value)) = (HeaderName::from_bytes(h.key.as_bytes()), value) {
            out.append(name, value);
        }
    }
    out
}

/// One length-prefixed, uncompressed gRPC message.
fn unframe(mut data: Bytes) -> Option<Bytes> {
    if data.len() < 5 || data[0] != 0 {
        return None;
    }
    data.advance(1);
    let len = usize::try_from(data.get_u32()).ok()?;
    (data.len() >= len).then(|| data.split_to(len))
}

fn check_request(auth: &ExternalAuth, req: &RequestView<'_>) -> CheckRequest {
    let mut sent = HeaderMap::new();
    auth.credential_headers(req, &mut sent);
    let mut headers = std::collections::HashMap::new();
    for name in sent.keys() {
        let joined: Vec<&str> = sent
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        headers.insert(name.as_str().to_owned(), joined.join(","));
    }
    let host = req
        .host
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let path = req.path_and_query();
    headers.insert(":authority".into(), host.clone());
    headers.insert(":method".into(), req.method.as_str().to_owned());
    headers.insert(":path".into(), path.clone());
    if let Ok(id) = req.request_id.1.to_str() {
        headers.insert(req.request_id.0.as_str().to_owned(), id.to_owned());
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: req.client_ip.to_string(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(0)),
                    })),
                }),
                principal: String::new(),
            }),
            destination: None,
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    id: req.request_id.1.to_str().unwrap_or("").to_owned(),
                    method: req.method.as_str().to_owned(),
                    headers,
                    path,
                    host,
                    scheme: req.scheme.to_owned(),
                    size: -1,
                    ..HttpRequest::default()
                }),
            }),
            context_extensions: std::collections::HashMap::new(),
        }),
    }
}

// The messages, from envoy/service/auth/v3/{external_auth,attribute_context}.proto,
// envoy/config/core/v3/{base,address}.proto, envoy/type/v3/http_status.proto and
// google/rpc/status.proto (fields the gateway neither sends nor reads are left out:
// prost skips them when decoding).

#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequest {
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<AttributeContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeContext {
    #[prost(message, optional, tag = "1")]
    pub source: Option<Peer>,
    #[prost(message, optional, tag = "2")]
    pub destination: Option<Peer>,
    #[prost(message, optional, tag = "4")]
    pub request: Option<AttrRequest>,
    #[prost(map = "string, string", tag = "10")]
    pub context_extensions: std::collections::HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Peer {
    #[prost(message, optional, tag = "1")]
    pub address: Option<Address>,
    #[prost(string, tag = "4")]
    pub principal: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Address {
    #[prost(oneof = "address::Address", tags = "1")]
    pub address: Option<address::Address>,
}

pub mod address {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Address {
        #[prost(message, tag = "1")]
        SocketAddress(super::SocketAddress),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SocketAddress {
    #[prost(string, tag = "2")]
    pub address: String,
    #[prost(oneof = "socket_address::PortSpecifier", tags = "3, 4")]
    pub port_specifier: Option<socket_address::PortSpecifier>,
}

pub mod socket_address {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum PortSpecifier {
        #[prost(uint32, tag = "3")]
        PortValue(u32),
        #[prost(string, tag = "4")]
        NamedPort(String),
    }
}

/// `AttributeContext.Request` (`time`, tag 1, is not sent).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttrRequest {
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpRequest>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub method: String,
    #[prost(map = "string, string", tag = "3")]
    pub headers: std::collections::HashMap<String, String>,
    #[prost(string, tag = "4")]
    pub path: String,
    #[prost(string, tag = "5")]
    pub host: String,
    #[prost(string, tag = "6")]
    pub scheme: String,
    #[prost(string, tag = "7")]
    pub query: String,
    #[prost(string, tag = "8")]
    pub fragment: String,
    #[prost(int64, tag = "9")]
    pub size: i64,
    #[prost(string, tag = "10")]
    pub protocol: String,
    #[prost(string, tag = "11")]
    pub body: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<RpcStatus>,
    #[prost(oneof = "check_response::HttpResponse", tags = "2, 3, 5")]
    pub http_response: Option<check_response::HttpResponse>,
}

pub mod check_response {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum HttpResponse {
        #[prost(message, tag = "2")]
        DeniedResponse(super::DeniedHttpResponse),
        #[prost(message, tag = "3")]
        OkResponse(super::OkHttpResponse),
        #[prost(message, tag = "5")]
        ErrorResponse(super::DeniedHttpResponse),
    }
}

/// `google.rpc.Status` (`details`, tag 3, is not read).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeniedHttpResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<HttpStatus>,
    #[prost(message, repeated, tag = "2")]
    pub headers: Vec<HeaderValueOption>,
    #[prost(string, tag = "3")]
    pub body: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OkHttpResponse {
    #[prost(message, repeated, tag = "2")]
    pub headers: Vec<HeaderValueOption>,
    #[prost(string, repeated, tag = "5")]
    pub headers_to_remove: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValueOption {
    #[prost(message, optional, tag = "1")]
    pub header: Option<EnvoyHeaderValue>,
    #[prost(int32, tag = "3")]
    pub append_action: i32,
}

/// `envoy.config.core.v3.HeaderValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EnvoyHeaderValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
    #[prost(bytes = "vec", tag = "3")]
    pub raw_value: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let msg = CheckResponse {
            status: Some(RpcStatus {
                code: 7,
                message: "no".into(),
            }),
            http_response: None,
        }
        .encode_to_vec();
        let mut framed = vec![0, 0, 0, 0, u8::try_from(msg.len()).unwrap()];
        framed.extend_from_slice(&msg);
        let inner = unframe(Bytes::from(framed)).unwrap();
        assert_eq!(
            CheckResponse::decode(inner).unwrap().status.unwrap().code,
            7
        );
        assert!(
            unframe(Bytes::from_static(&[1, 0, 0, 0, 0])).is_none(),
            "compressed"
        );
        assert!(
            unframe(Bytes::from_static(&[0, 0, 0, 0, 9, 1])).is_none(),
            "short"
        );
        assert!(unframe(Bytes::from_static(&[0, 0])).is_none());
    }

    #[test]
    fn header_options_become_headers() {
        let opts = vec![
            HeaderValueOption {
                header: Some(EnvoyHeaderValue {
                    key: "x-auth-principal".into(),
                    value: "alice".into(),
                    raw_value: Vec::new(),
                }),
                append_action: 0,
            },
            HeaderValueOption {
                header: Some(EnvoyHeaderValue {
                    key: "bad header".into(),
                    value: "x".into(),
                    raw_value: Vec::new(),
                }),
                append_action: 0,
            },
        ];
        let h = header_map(&opts);
        assert_eq!(h.get("x-auth-principal").unwrap(), "alice");
        assert_eq!(h.len(), 1);
    }
}
