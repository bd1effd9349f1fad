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

/// File descriptors `serve` keeps for everything but client connections:
/// the database pools (16 PostgreSQL sockets, or ten SQLite connections of
/// three files each), report files, the listener, stdio and the runtime's own.
const FILES_BESIDES_CONNECTIONS: u64 = 256;

/// How many client connections `serve` may hold open at once: `requested`
/// (`--max-connections`) when the process may open that many files besides
/// [`FILES_BESIDES_CONNECTIONS`]. The soft open-file limit (`ulimit -n`) is
/// raised toward the hard one as far as that needs, as Go's runtime and
/// most servers do; past the hard limit the cap is lowered to what fits,
/// with a warning. Without a cap, clients could take every file descriptor,
/// and the database connections and report files would fail instead.
pub fn connection_cap(requested: usize) -> usize {
    let requested = u64::try_from(requested).unwrap_or(u64::MAX);
    let wanted = requested.saturating_add(FILES_BESIDES_CONNECTIONS);
    let files = match rlimit::increase_nofile_limit(wanted) {
        Ok(files) => files,
        Err(error) => {
            tracing::warn!(error = %error, "cannot read or raise the open-file limit: {error}; keeping --max-connections {requested}");
            wanted
        }
    };
    let cap = cap_within(requested, files);
    if cap < requested {
        tracing::warn!(
            max_connections = requested,
            open_file_limit = files,
            serving_at_most = cap,
            "--max-connections {requested} does not fit the open-file limit of {files} (ulimit -n; {FILES_BESIDES_CONNECTIONS} \
             are kept for the database and files): serving at most {cap} connections at once; raise the hard limit \
             (LimitNOFILE= in a systemd unit) or lower --max-connections"
        );
    }
    usize::try_from(cap).unwrap_or(usize::MAX)
}

/// The cap for `requested` connections when the process may open `files`
/// files: never below one, so a server always answers.
fn cap_within(requested: u64, files: u64) -> u64 {
    requested.min(files.saturating_sub(FILES_BESIDES_CONNECTIONS)).max(1)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_is_what_was_asked_when_the_files_allow_it() {
        assert_eq!(cap_within(1024, 1024 + FILES_BESIDES_CONNECTIONS), 1024);
        assert_eq!(cap_within(1024, 1_048_576), 1024);
    }

    #[test]
    fn the_connection_cap_leaves_room_for_the_database_when_the_files_do_not() {
        assert_eq!(cap_within(1024, 1024), 1024 - FILES_BESIDES_CONNECTIONS);
        // A limit below the room kept still serves one connection at a time.
        assert_eq!(cap_within(1024, 100), 1);
    }
}
