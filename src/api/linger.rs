//! Request bodies that are drained, not cut off, when a handler answers without reading them.
//!
//! A server that answers early (413 from `Content-Length`, 401, 415, a 429 before the body is
//! read) and drops the request body closes the connection with the client's bytes unread, and
//! the kernel answers those with a reset: a client still sending gets `EPIPE`/`ECONNRESET`,
//! and a reset can discard the answer from its receive buffer before it is read. Most HTTP
//! clients then report a connection error instead of the status and its `Retry-After`.
//! [`Body`] wraps hyper's body: dropped before its end, it hands the rest to a task that reads
//! and discards it, at most [`LINGER_BYTES`] for at most [`LINGER_TIME`] (as a web server's
//! lingering close does). hyper keeps the connection reading while that task holds the body,
//! so the answer goes out first and the client can finish sending.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};

/// The most of an unread body drained after an early answer.
pub const LINGER_BYTES: u64 = 64 << 20;
/// The longest an unread body is drained after an early answer.
pub const LINGER_TIME: Duration = Duration::from_secs(3);

pub struct Body {
    inner: Option<Incoming>,
    /// Set once the body is first read (hyper then sends the `100 Continue`, and the client
    /// its body); only for a request that expects a `100 Continue` (`expect_continue`), whose
    /// body is not drained if it was never read.
    polled: Option<Arc<AtomicBool>>,
}

impl Body {
    pub fn new(inner: Incoming) -> Body {
        Body {
            inner: Some(inner),
            polled: None,
        }
    }

    /// For a request sent with `Expect: 100-continue`: a client told the final answer before
    /// the `100 Continue` need not send the body, so draining it would read the client's next
    /// request as this one's body (and answer it never). Such a body, never read, is not
    /// drained, and the answer closes the connection (`Connection: close`); the flag returned
    /// tells whether it was read (a body with nothing to send counts as read). One whose
    /// reading began (the client was told to send it) is drained as any other.
    pub fn expect_continue(&mut self) -> Arc<AtomicBool> {
        let empty = self
            .inner
            .as_ref()
            .is_none_or(hyper::body::Body::is_end_stream);
        let flag = Arc::new(AtomicBool::new(empty));
        self.polled = Some(flag.clone());
        flag
    }

    /// Drops the body without draining it: for a client already known to be too slow (its
    /// body did not arrive in time), whose connection is closed rather than kept reading.
    pub fn discard(mut self) {
        self.inner.take();
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(flag) = &self.polled {
            flag.store(true, Ordering::Relaxed);
        }
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), hyper::body::Body::size_hint)
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        let Some(mut inner) = self.inner.take() else {
            return;
        };
        let never_read = self
            .polled
            .as_ref()
            .is_some_and(|polled| !polled.load(Ordering::Relaxed));
        if hyper::body::Body::is_end_stream(&inner) || never_read {
            return;
        }
        // Outside a runtime (never on a request path) the body is dropped as before.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let drain = async {
                let mut read = 0u64;
                while read < LINGER_BYTES {
                    match inner.frame().await {
                        Some(Ok(frame)) => {
                            read += frame.data_ref().map_or(0, |d| d.len() as u64);
                        }
                        // The end, or the client went away.
                        _ => break,
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER_TIME, drain).await;
        });
    }
}
