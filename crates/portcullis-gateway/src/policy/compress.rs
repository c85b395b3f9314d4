//! Response compression (gzip, br, zstd), streaming.
//!
//! `on_request` reads the client's `Accept-Encoding` (q-values, `q=0`, `*`) and picks
//! the first of the route's `algorithms` with the highest q; `on_response` wraps an
//! eligible body in [`CompressBody`], which compresses frame by frame and flushes
//! whenever the upstream has nothing more ready, so a slow stream is never held back
//! waiting for the encoder's buffer to fill. Nothing is ever buffered whole.
//!
//! Never compressed: `text/event-stream`, bodies that already have a
//! `Content-Encoding`, bodies whose `Content-Length` is below `min_size`, 204, 206,
//! 304, 1xx, HEAD, `Cache-Control: no-transform`, and types not in `content_types`.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame};
use hyper::body::Incoming;

use super::{Flow, PolicySite};
use crate::body::{Body, BoxError};
use crate::context::RequestCtx;
use crate::error::GatewayError;
use crate::snapshot::Errors;

/// An encoding the gateway can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Gzip,
    Br,
    Zstd,
}

impl Algorithm {
    fn parse(s: &str) -> Option<Algorithm> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Some(Algorithm::Gzip),
            "br" => Some(Algorithm::Br),
            "zstd" => Some(Algorithm::Zstd),
            _ => None,
        }
    }

    fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Algorithm::Gzip => "gzip",
            Algorithm::Br => "br",
            Algorithm::Zstd => "zstd",
        })
    }
}

/// Per-request state: the encoding the client accepts, if any.
#[derive(Default)]
pub struct CompressState {
    chosen: Option<Algorithm>,
    /// HEAD: the response is never compressed (and has no body to compress).
    head: bool,
}

pub struct Compression {
    /// In order of preference.
    algorithms: Vec<Algorithm>,
    min_size: u64,
    /// Lower-case media types; a trailing `/*` matches the whole top-level type.
    content_types: Vec<String>,
}

pub(crate) fn compile(
    config: &portcullis_config::CompressionConfig,
    site: &PolicySite<'_>,
    errors: &mut Errors<'_>,
) -> Option<Compression> {
    let field = site.field("compression");
    let mut algorithms = Vec::new();
    let mut ok = true;
    for (i, a) in config.algorithms.iter().enumerate() {
        match Algorithm::parse(a) {
            Some(alg) if !algorithms.contains(&alg) => algorithms.push(alg),
            Some(_) => {}
            None => {
                ok = false;
                errors.push(
                    site.at,
                    format!("{field}.algorithms[{i}]"),
                    format!(
                        "unknown algorithm {:?} (expected br, zstd or gzip)",
                        a.as_str()
                    ),
                );
            }
        }
    }
    if algorithms.is_empty() && ok {
        errors.push(
            site.at,
            format!("{field}.algorithms"),
            "list at least one of br, zstd, gzip (or set `compression: false`)",
        );
        ok = false;
    }
    let mut content_types = Vec::new();
    for (i, t) in config.content_types.iter().enumerate() {
        let t = t.trim().to_ascii_lowercase();
        if t == "*" || t == "*/*" || (t.contains('/') && !t.contains(char::is_whitespace)) {
            content_types.push(t);
        } else {
            ok = false;
            errors.push(
                site.at,
                format!("{field}.content_types[{i}]"),
                format!("{t:?} is not a media type (`type/subtype` or `type/*`)"),
            );
        }
    }
    ok.then_some(Compression {
        algorithms,
        min_size: config.min_size.0,
        content_types,
    })
}

impl Compression {
    pub(super) fn on_request(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: &mut Request<Incoming>,
    ) -> Result<Flow, GatewayError> {
        ctx.compress.head = req.method() == Method::HEAD;
        ctx.compress.chosen = negotiate(req.headers(), &self.algorithms);
        Ok(Flow::Continue)
    }

    pub(super) fn on_response(&self, ctx: &mut RequestCtx<'_>, res: &mut Response<Body>) {
        if ctx.compress.head || !self.eligible(res) {
            return;
        }
        // The representation now depends on Accept-Encoding, whether or not this
        // client gets it compressed.
        add_vary_accept_encoding(res.headers_mut());
        let Some(alg) = ctx.compress.chosen else {
            return;
        };
        let headers = res.headers_mut();
        headers.insert(header::CONTENT_ENCODING, alg.header());
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::ACCEPT_RANGES);
        weaken_etag(headers);
        let inner = std::mem::replace(res.body_mut(), Body::empty());
        *res.body_mut() = Body::Compressed(Box::new(CompressBody::new(inner, alg)));
    }

    /// Whether the response may be compressed (for any client).
    fn eligible(&self, res: &Response<Body>) -> bool {
        let status = res.status();
        if status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status == StatusCode::PARTIAL_CONTENT
        {
            return false;
        }
        let headers = res.headers();
        if headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
        {
            return false;
        }
        if headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"no-transform"))
        {
            return false;
        }
        let Some(media) = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(media_type)
        else {
            return false;
        };
        if media == "text/event-stream" || !self.type_listed(&media) {
            return false;
        }
        let length = match headers.get(header::CONTENT_LENGTH) {
            Some(v) => v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()),
            None => res.body().size_hint().exact(),
        };
        // No length known: a stream, compressed.
        length.is_none_or(|n| n >= self.min_size && n > 0)
    }

    fn type_listed(&self, media: &str) -> bool {
        self.content_types.iter().any(|t| {
            if t == "*" || t == "*/*" {
                return true;
            }
            match t.strip_suffix("/*") {
                Some(top) => media
                    .strip_prefix(top)
                    .is_some_and(|rest| rest.starts_with('/')),
                None => t == media,
            }
        })
    }
}

/// `text/html; charset=utf-8` → `text/html`.
fn media_type(v: &str) -> String {
    v.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether a comma-separated header value has `token` (case-insensitive, params ignored).
fn has_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|&b| b == b',').any(|item| {
        let name = item.split(|&b| b == b'=').next().unwrap_or(b"");
        name.trim_ascii().eq_ignore_ascii_case(token)
    })
}

/// Picks the encoding: highest q among `algorithms` the client accepts (explicitly or
/// through `*`), ties going to the earlier algorithm. No header, or nothing
/// acceptable: `None` (identity).
pub fn negotiate(headers: &HeaderMap, algorithms: &[Algorithm]) -> Option<Algorithm> {
    let mut explicit: Vec<(Algorithm, f32)> = Vec::new();
    let mut star: Option<f32> = None;
    let mut any = false;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            if coding.is_empty() {
                continue;
            }
            any = true;
            let mut q = 1.0f32;
            for p in parts {
                let Some((k, v)) = p.split_once('=') else {
                    continue;
                };
                if k.trim().eq_ignore_ascii_case("q") {
                    // A malformed q-value counts as 0: refuse rather than guess.
                    q = v
                        .trim()
                        .parse::<f32>()
                        .ok()
                        .filter(|q| (0.0..=1.0).contains(q))
                        .unwrap_or(0.0);
                }
            }
            if coding == "*" {
                star = Some(q);
            } else if let Some(alg) = Algorithm::parse(coding) {
                // The first mention of a coding wins.
                if !explicit.iter().any(|(a, _)| *a == alg) {
                    explicit.push((alg, q));
                }
            }
        }
    }
    if !any {
        return None;
    }
    let mut best: Option<(Algorithm, f32)> = None;
    for &alg in algorithms {
        let q = explicit
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, q)| *q)
            .or(star)
            .unwrap_or(0.0);
        if q > 0.0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((alg, q));
        }
    }
    best.map(|(a, _)| a)
}

fn add_vary_accept_encoding(headers: &mut HeaderMap) {
    let present = headers
        .get_all(header::VARY)
        .iter()
        .any(|v| v.as_bytes() == b"*" || has_token(v.as_bytes(), b"accept-encoding"));
    if !present {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// A strong ETag names exact bytes, which the compressed body no longer has.
fn weaken_etag(headers: &mut HeaderMap) {
    let Some(etag) = headers.get(header::ETAG) else {
        return;
    };
    let b = etag.as_bytes();
    if b.starts_with(b"W/") {
        return;
    }
    let mut weak = Vec::with_capacity(b.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(b);
    match HeaderValue::from_bytes(&weak) {
        Ok(v) => {
            headers.insert(header::ETAG, v);
        }
        Err(_) => {
            headers.remove(header::ETAG);
        }
    }
}

enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Encoder {
    fn new(alg: Algorithm) -> std::io::Result<Encoder> {
        Ok(match alg {
            Algorithm::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(5),
            )),
            // Quality 4: a good ratio at a speed fit for dynamic responses.
            Algorithm::Br => Encoder::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                4,
                22,
            ))),
            Algorithm::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(Vec::new(), 3)?),
        })
    }

    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.write_all(data),
            Encoder::Br(e) => e.write_all(data),
            Encoder::Zstd(e) => e.write_all(data),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Br(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Encoder::Gzip(e) => e.get_mut(),
            Encoder::Br(e) => e.get_mut(),
            Encoder::Zstd(e) => e.get_mut(),
        }
    }

    /// Ends the stream; returns what is left to send.
    fn finish(self) -> std::io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Br(e) => Ok(e.into_inner()),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

/// Sends the output once this much has piled up, without waiting for a flush.
const EMIT_AT: usize = 16 * 1024;

/// A body compressed on the fly.
pub struct CompressBody {
    inner: Body,
    encoder: Option<Encoder>,
    /// Data written since the last flush.
    dirty: bool,
    trailers: Option<HeaderMap>,
    done: bool,
}

impl CompressBody {
    fn new(inner: Body, alg: Algorithm) -> CompressBody {
        let encoder = Encoder::new(alg)
            .map_err(|e| tracing::warn!(error = %e, "cannot start the compressor"))
            .ok();
        CompressBody {
            inner,
            encoder,
            dirty: false,
            trailers: None,
            done: false,
        }
    }

    fn take_output(&mut self) -> Option<Bytes> {
        let out = self.encoder.as_mut()?.output();
        (!out.is_empty()).then(|| Bytes::from(std::mem::take(out)))
    }

    /// Ends the stream; the rest of the output, if any.
    fn finish(&mut self) -> Result<Option<Bytes>, BoxError> {
        self.done = true;
        match self.encoder.take() {
            Some(e) => {
                let rest = e.finish()?;
                Ok((!rest.is_empty()).then(|| Bytes::from(rest)))
            }
            None => Ok(None),
        }
    }
}

impl HttpBody for CompressBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            if this.encoder.is_none() {
                return Poll::Ready(Some(Err("the compressor could not start".into())));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if data.is_empty() {
                            continue;
                        }
                        let Some(enc) = this.encoder.as_mut() else {
                            continue;
                        };
                        enc.write_all(&data)?;
                        this.dirty = true;
                        if enc.output().len() >= EMIT_AT {
                            if let Some(out) = this.take_output() {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                        }
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            this.trailers = Some(t);
                        }
                        let mut out = this.take_output().map(Vec::from).unwrap_or_default();
                        if let Some(rest) = this.finish()? {
                            out.extend_from_slice(&rest);
                        }
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    let mut out = this.take_output().map(Vec::from).unwrap_or_default();
                    if let Some(rest) = this.finish()? {
                        out.extend_from_slice(&rest);
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
                Poll::Pending => {
                    // Nothing more ready upstream: send what we have, so a slow
                    // stream reaches the client as it comes.
                    if this.dirty {
                        this.dirty = false;
                        if let Some(enc) = this.encoder.as_mut() {
                            enc.flush()?;
                        }
                    }
                    if let Some(out) = this.take_output() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn ae(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        h
    }

    const ALL: &[Algorithm] = &[Algorithm::Br, Algorithm::Zstd, Algorithm::Gzip];

    #[test]
    fn negotiation_respects_q_values_and_preference() {
        assert_eq!(negotiate(&HeaderMap::new(), ALL), None);
        assert_eq!(negotiate(&ae("gzip"), ALL), Some(Algorithm::Gzip));
        assert_eq!(negotiate(&ae("gzip, br"), ALL), Some(Algorithm::Br));
        assert_eq!(
            negotiate(&ae("gzip, deflate, br, zstd"), ALL),
            Some(Algorithm::Br)
        );
        assert_eq!(negotiate(&ae("br;q=0.5, gzip"), ALL), Some(Algorithm::Gzip));
        assert_eq!(
            negotiate(&ae("br;q=0, gzip;q=0.1"), ALL),
            Some(Algorithm::Gzip)
        );
        assert_eq!(negotiate(&ae("br;q=0"), ALL), None);
        assert_eq!(negotiate(&ae("identity"), ALL), None);
        assert_eq!(negotiate(&ae("*"), ALL), Some(Algorithm::Br));
        assert_eq!(negotiate(&ae("*;q=0"), ALL), None);
        assert_eq!(negotiate(&ae("br;q=0, *"), ALL), Some(Algorithm::Zstd));
        assert_eq!(negotiate(&ae("GZIP;Q=1"), ALL), Some(Algorithm::Gzip));
        assert_eq!(negotiate(&ae("gzip;q=bogus"), ALL), None);
        assert_eq!(
            negotiate(&ae("gzip, br"), &[Algorithm::Gzip]),
            Some(Algorithm::Gzip)
        );
        assert_eq!(negotiate(&ae("br"), &[Algorithm::Gzip]), None);
    }

    fn policy() -> Compression {
        Compression {
            algorithms: ALL.to_vec(),
            min_size: 10,
            content_types: vec!["text/*".into(), "application/json".into()],
        }
    }

    fn response(ct: &str, len: Option<usize>) -> Response<Body> {
        let mut res = Response::new(Body::full("x".repeat(len.unwrap_or(100))));
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        if let Some(n) = len {
            res.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        res
    }

    #[test]
    fn eligibility_rules() {
        let p = policy();
        assert!(p.eligible(&response("text/html; charset=utf-8", Some(100))));
        assert!(p.eligible(&response("application/json", None)));
        assert!(!p.eligible(&response("text/event-stream", Some(100))));
        assert!(!p.eligible(&response("image/png", Some(100))));
        assert!(!p.eligible(&response("textual/x", Some(100))));
        assert!(!p.eligible(&response("text/plain", Some(5))));
        let mut r = response("text/plain", Some(100));
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(!p.eligible(&r));
        let mut r = response("text/plain", Some(100));
        *r.status_mut() = StatusCode::NO_CONTENT;
        assert!(!p.eligible(&r));
        let mut r = response("text/plain", Some(100));
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, no-transform"),
        );
        assert!(!p.eligible(&r));
    }

    #[test]
    fn etags_are_weakened_and_vary_added_once() {
        let mut h = HeaderMap::new();
        h.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        weaken_etag(&mut h);
        assert_eq!(h[header::ETAG], "W/\"abc\"");
        weaken_etag(&mut h);
        assert_eq!(h[header::ETAG], "W/\"abc\"");
        h.insert(header::VARY, HeaderValue::from_static("Accept-Language"));
        add_vary_accept_encoding(&mut h);
        add_vary_accept_encoding(&mut h);
        assert_eq!(h.get_all(header::VARY).iter().count(), 2);
    }

    #[tokio::test]
    async fn every_algorithm_round_trips() {
        let original = "hello compressed world ".repeat(500);
        for alg in ALL {
            let body = CompressBody::new(Body::full(original.clone()), *alg);
            let out = body.collect().await.unwrap().to_bytes();
            let mut decoded = Vec::new();
            match alg {
                Algorithm::Gzip => {
                    std::io::Read::read_to_end(
                        &mut flate2::read::GzDecoder::new(&out[..]),
                        &mut decoded,
                    )
                    .unwrap();
                }
                Algorithm::Br => {
                    std::io::Read::read_to_end(
                        &mut brotli::Decompressor::new(&out[..], 4096),
                        &mut decoded,
                    )
                    .unwrap();
                }
                Algorithm::Zstd => decoded = zstd::stream::decode_all(&out[..]).unwrap(),
            }
            assert_eq!(decoded, original.as_bytes(), "{alg:?}");
            assert!(out.len() < original.len() / 4);
        }
    }
}
