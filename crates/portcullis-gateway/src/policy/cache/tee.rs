//! The response body streamed to the client while the cache collects it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::storage::{Commit, Inner};
use crate::body::{Body, BoxError};

/// A response body streamed to the client while the cache collects it; stored when
/// complete, given up past `max_body`, on an error, trailers, or if dropped early.
pub struct TeeBody {
    pub(super) inner: Body,
    pub(super) collected: Vec<Bytes>,
    pub(super) size: u64,
    pub(super) limit: u64,
    /// The registry whose `collecting` counts `size` while collecting.
    pub(super) budget: Arc<Inner>,
    pub(super) commit: Option<Box<Commit>>,
}

impl TeeBody {
    pub(super) fn give_up(&mut self) {
        self.commit = None;
        self.collected = Vec::new();
        self.release();
    }

    /// Returns the bytes this body reserved from the collecting budget.
    pub(super) fn release(&mut self) {
        let held = std::mem::take(&mut self.size);
        self.budget
            .collecting
            .fetch_sub(held, std::sync::atomic::Ordering::Relaxed);
    }

    /// Reserves `n` more bytes; false when every collection together would exceed
    /// the local cache's size (slow readers must not pin unbounded memory).
    pub(super) fn reserve(&mut self, n: u64) -> bool {
        let budget = self.budget.local.load().max_bytes;
        let before = self
            .budget
            .collecting
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        self.size += n;
        before + n <= budget
    }

    pub(super) fn complete(&mut self) {
        let Some(commit) = self.commit.take() else {
            return;
        };
        let parts = std::mem::take(&mut self.collected);
        let capacity = self.size as usize;
        self.release();
        let body = match parts.len() {
            0 => Bytes::new(),
            1 => parts.into_iter().next().unwrap_or_default(),
            _ => {
                let mut b = BytesMut::with_capacity(capacity);
                for p in parts {
                    b.extend_from_slice(&p);
                }
                b.freeze()
            }
        };
        commit.run(body);
    }
}

impl HttpBody for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if this.commit.is_some() {
                    match frame.data_ref() {
                        Some(data) => {
                            let fits = this.reserve(data.len() as u64);
                            if !fits || this.size > this.limit {
                                this.give_up();
                            } else if !data.is_empty() {
                                this.collected.push(data.clone());
                            }
                        }
                        None => this.give_up(),
                    }
                }
                if this.inner.is_end_stream() {
                    this.complete();
                }
            }
            Poll::Ready(Some(Err(_))) => this.give_up(),
            Poll::Ready(None) => this.complete(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TeeBody {
    fn drop(&mut self) {
        self.release();
    }
}
