//! A connection whose writes give up when the client stops reading.
//!
//! hyper bounds how long a request's head may take (`header_read_timeout`),
//! but not how long an answer may wait for the client to take it: a client
//! that pipelines requests and never reads kept its connection, and the
//! answers queued for it, for ever (review AY). [`WriteDeadline`] fails a
//! write that has made no progress for the read timeout, which ends the
//! connection; [`wake_writes_often`] makes sure a client that reads, however
//! slowly, lets a write make progress well within it.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};

/// Unsent bytes a socket holds before a write waits: TCP_NOTSENT_LOWAT. A
/// waiting write is woken once half of them have been sent, that is, once
/// the client has read about 16 KiB. Without it Linux wakes a writer only
/// when a third of the send buffer is free, and the buffer grows to 4 MiB:
/// a client reading a large answer at 20 KB/s was cut off by the stall
/// timeout while it read (review AZ). What is in flight stays unbounded, so
/// a fast client's throughput is not held back.
const NOT_SENT_LOW_WATER: u32 = 32 * 1024;

/// Sets [`NOT_SENT_LOW_WATER`] on an accepted socket (Linux; elsewhere the
/// kernel's own wake-up applies, and a very slow reader of a large answer
/// may be cut off by the write stall timeout).
pub fn wake_writes_often(stream: &tokio::net::TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(NOT_SENT_LOW_WATER) {
        tracing::debug!(error = %error, "cannot set TCP_NOTSENT_LOWAT: {error}");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stream;
}

/// An I/O whose writes fail once one has waited `timeout` without progress.
pub struct WriteDeadline<T> {
    inner: T,
    timeout: Duration,
    /// Started when a write (or flush) first finds the socket full; cleared
    /// by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    /// `inner`, whose writes may wait at most `timeout` for the client.
    pub fn new(inner: T, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// What a write that returned `poll` answers: progress clears the
    /// stall; a wait starts it or, past the timeout, fails.
    fn judge<R>(&mut self, poll: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took no answer for {} s", timeout.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: Read + Unpin> Read for WriteDeadline<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for WriteDeadline<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.judge(poll, cx)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.judge(poll, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.judge(poll, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.judge(poll, cx)
    }
}
