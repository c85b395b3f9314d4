//! The response and request body types of the data path.
//!
//! An enum rather than a boxed trait object, so the common cases (a fixed body, an
//! upstream stream) cost no allocation.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body of every response the gateway sends.
pub enum Body {
    Empty,
    Full(Option<Bytes>),
    /// An upstream response streamed through, cut if silent for longer than `idle`.
    Upstream(IdleTimeout<crate::upstream::PooledBody>),
    /// A client's request body streamed to an upstream.
    Client(IdleTimeout<Incoming>),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
    /// Compressed on the fly ([`crate::policy::compress`]).
    Compressed(Box<crate::policy::compress::CompressBody>),
    /// Streamed to the client while the cache collects it ([`crate::policy::cache`]).
    Tee(Box<crate::policy::cache::TeeBody>),
}

impl Body {
    pub fn empty() -> Self {
        Body::Empty
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Body::Full(Some(bytes.into()))
    }

    pub fn boxed<B>(body: B) -> Self
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        Body::Boxed(body.map_err(Into::into).boxed_unsync())
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Upstream(b) => Pin::new(b).poll_frame(cx),
            Body::Client(b) => Pin::new(b).poll_frame(cx),
            Body::Boxed(b) => Pin::new(b).poll_frame(cx),
            Body::Compressed(b) => Pin::new(&mut **b).poll_frame(cx),
            Body::Tee(b) => Pin::new(&mut **b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(data) => data.is_none(),
            Body::Upstream(b) => b.is_end_stream(),
            Body::Client(b) => b.is_end_stream(),
            Body::Boxed(b) => b.is_end_stream(),
            Body::Compressed(b) => b.is_end_stream(),
            Body::Tee(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Body::Upstream(b) => b.size_hint(),
            Body::Client(b) => b.size_hint(),
            Body::Boxed(b) => b.size_hint(),
            Body::Compressed(b) => b.size_hint(),
            Body::Tee(b) => b.size_hint(),
        }
    }
}

/// The body went silent for longer than the route's idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("body idle for longer than {0:?}")]
pub struct IdleTimedOut(pub Duration);

/// The exchange ran past the route's total timeout.
#[derive(Debug, thiserror::Error)]
#[error("total timeout exceeded")]
pub struct DeadlineExceeded;

/// A request body grew past the route's limit.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// Cuts a body that sends nothing for `idle`. The timer is only created once the body
/// first has to wait, so bodies that are ready at once (most small ones) never pay for it.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Hard deadline for the whole body (`timeouts.total`).
    deadline: Option<Pin<Box<Sleep>>>,
    /// Body size limit (request bodies only); `u64::MAX` for none.
    limit: u64,
    seen: u64,
    /// Request bodies: trailers are never forwarded (a client could smuggle identity
    /// headers through them, and HTTP/1 upstreams would merge them).
    drop_trailers: bool,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            sleep: None,
            deadline: None,
            limit: u64::MAX,
            seen: 0,
            drop_trailers: false,
        }
    }

    pub fn without_trailers(mut self) -> Self {
        self.drop_trailers = true;
        self
    }

    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        self
    }
}

impl<B> HttpBody for IdleTimeout<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(Err(Box::new(DeadlineExceeded))));
            }
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(frame) => {
                    if let Some(sleep) = this.sleep.as_mut() {
                        sleep.as_mut().reset(Instant::now() + this.idle);
                    }
                    let frame = match frame {
                        Some(Ok(frame)) => frame,
                        Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                        None => return Poll::Ready(None),
                    };
                    if let Some(data) = frame.data_ref() {
                        this.seen += data.len() as u64;
                        if this.seen > this.limit {
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge(this.limit)))));
                        }
                    } else if this.drop_trailers && frame.is_trailers() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Pending => {
                    let idle = this.idle;
                    let sleep = this
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                    ready!(sleep.as_mut().poll(cx));
                    return Poll::Ready(Some(Err(Box::new(IdleTimedOut(idle)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future;

/// Finds an error of type `E` anywhere in `err`'s source chain.
pub fn find_cause<'a, E: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        // `io::Error::source` skips its own payload; look at it too.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(found) = inner.downcast_ref::<E>() {
                return Some(found);
            }
        }
        current = e.source();
    }
    None
}

/// How long a gateway-handled body (login, admin API) may take to arrive.
pub const SMALL_BODY_DEADLINE: Duration = Duration::from_secs(10);

/// Reads a small body the gateway itself answers (login, admin API): at most
/// `limit` bytes within [`SMALL_BODY_DEADLINE`], else 413 or 408.
pub async fn read_small<B>(body: B, limit: usize) -> Result<Bytes, crate::error::GatewayError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    use crate::error::{ErrorCode, GatewayError};
    use http_body_util::BodyExt;
    match tokio::time::timeout(
        SMALL_BODY_DEADLINE,
        http_body_util::Limited::new(body, limit).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(GatewayError::new(
                ErrorCode::PayloadTooLarge,
                format!("request body larger than {limit} bytes"),
            ))
        }
        Ok(Err(_)) => Err(GatewayError::new(
            ErrorCode::BadRequest,
            "the request body is incomplete",
        )),
        Err(_) => Err(GatewayError::new(
            ErrorCode::RequestTimeout,
            "request body not received in time",
        )),
    }
}
