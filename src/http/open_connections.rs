//! The connections `serve` holds open, so that it can close a quiet one when
//! a client waits at the connection cap, and the quiet ones at a stop.
//!
//! A kept-alive connection with no request in flight gave up its slot only
//! at the read timeout (30 s): at the cap, with every slot held by idle
//! connections of callers' pools, a client waiting (a liveness probe) waited
//! that long; so did it behind connections that sent nothing at all (a
//! pool's connections opened ahead of need), as nginx, which closes those
//! too when it runs out of connections, does not make it wait. HTTP/1.1 lets a server close an idle connection at any time,
//! but a client may be sending its next request on it at that very moment,
//! and that request is then lost unanswered. So only a connection quiet for
//! [`IDLE_BEFORE_CLOSING`] is closed for a waiting client, the one quiet
//! longest (clients' pools reuse the one used last); a client that sends
//! back to back is never idle that long, and is told to close by its next
//! answer instead (`Connection: close`, which loses nothing; review BR saw
//! 1 340 of 84 000 requests lost when any connection between two requests
//! could be closed). Quiet means no request in flight and no byte read or
//! written since it was accepted or last answered ([`Activity`]): hyper
//! takes an answer whole and writes it on
//! after the request is done, and a request's first bytes arrive before
//! hyper hands it on (review BS).
//!
//! A stop closes, the same way, only connections quiet for
//! [`IDLE_BEFORE_CLOSING`] ([`OpenConnections::close_quiet`]): closing every
//! one at once dropped the request a client sending back to back had just
//! sent (review BS: 13 of 16 connections). The others are told to close by
//! their next answer, which carries `Connection: close` from the stop on.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Read, ReadBufCursor, Write};

use tokio::sync::Notify;

/// How long a connection must have had nothing to do before it may be
/// closed for a client waiting at the cap, or at a stop.
pub const IDLE_BEFORE_CLOSING: Duration = Duration::from_secs(1);

/// One open connection, as the serve loop sees it.
pub struct OpenConnection {
    /// The registry's clock's start, which `last_answered` counts from.
    epoch: Instant,
    /// Requests of this connection being handled or answered (at most one:
    /// HTTP/1.1 answers in order).
    handling: AtomicUsize,
    /// When its last request was answered (handed to hyper), in µs after
    /// `epoch`, plus one; 0 while it has had none.
    last_answered: AtomicU64,
    /// When its socket last gave or took bytes, or else when it was
    /// accepted, in µs after `epoch`.
    last_active: AtomicU64,
    /// Whether it has been told to close: not told twice, nor counted twice
    /// for two waiting clients.
    told: AtomicBool,
    /// Wakes the connection's task to close it, after the request in
    /// flight, if any, is answered.
    close: Notify,
}

impl OpenConnection {
    fn new(epoch: Instant) -> Self {
        let accepted = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        Self {
            epoch,
            handling: AtomicUsize::new(0),
            last_answered: AtomicU64::new(0),
            last_active: AtomicU64::new(accepted),
            told: AtomicBool::new(false),
            close: Notify::new(),
        }
    }

    /// Marks a request of this connection in flight until the guard drops,
    /// once its answer is handed to hyper (the bytes hyper writes after
    /// that are stamped by [`Activity`]).
    pub fn handling(self: &Arc<Self>) -> Handling {
        self.handling.fetch_add(1, Ordering::AcqRel);
        Handling(self.clone())
    }

    /// Resolves when the connection is told to close.
    pub async fn told_to_close(&self) {
        self.close.notified().await;
    }

    /// Tells the connection to close; false when it was told already.
    fn tell_to_close(&self) -> bool {
        if self.told.swap(true, Ordering::AcqRel) {
            return false;
        }
        // A stored permit: the task sees it even if it is not waiting yet.
        self.close.notify_one();
        true
    }

    /// How long, at `now`, it has had nothing to do since it was accepted,
    /// its last answer, and its last byte read or written; None while a
    /// request is in flight or once told to close.
    fn quiet_for(&self, now: Instant) -> Option<Duration> {
        if self.told.load(Ordering::Acquire) || self.handling.load(Ordering::Acquire) > 0 {
            return None;
        }
        let answered = self.last_answered.load(Ordering::Acquire).saturating_sub(1);
        let busy_until = answered.max(self.last_active.load(Ordering::Acquire));
        Some(now.saturating_duration_since(self.epoch + Duration::from_micros(busy_until)))
    }

    /// µs from `epoch` to now.
    fn now_since_epoch(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1)
    }
}

/// A connection's I/O, stamping its [`OpenConnection`] active at each read
/// or write that moves bytes: a connection still writing a large answer to a
/// slow reader, or whose next request is arriving, is not idle.
pub struct Activity<T> {
    inner: T,
    connection: Arc<OpenConnection>,
}

impl<T> Activity<T> {
    /// `inner`, stamping `connection`.
    pub fn new(inner: T, connection: Arc<OpenConnection>) -> Self {
        Self { inner, connection }
    }

    fn stamp_if_moved<R>(&self, poll: &Poll<std::io::Result<R>>) {
        if matches!(poll, Poll::Ready(Ok(_))) {
            let now = self.connection.now_since_epoch();
            self.connection.last_active.store(now, Ordering::Release);
        }
    }
}

impl<T: Read + Unpin> Read for Activity<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.stamp_if_moved(&poll);
        poll
    }
}

impl<T: Write + Unpin> Write for Activity<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.stamp_if_moved(&poll);
        poll
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.stamp_if_moved(&poll);
        poll
    }
}

/// A request in flight on an [`OpenConnection`]; dropped once it is answered.
pub struct Handling(Arc<OpenConnection>);

impl Drop for Handling {
    fn drop(&mut self) {
        let since_epoch = self.0.now_since_epoch();
        self.0.last_answered.store(since_epoch + 1, Ordering::Release);
        self.0.handling.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every connection open, by a number of its own.
pub struct OpenConnections {
    epoch: Instant,
    next: AtomicUsize,
    open: Mutex<HashMap<usize, Arc<OpenConnection>>>,
}

impl Default for OpenConnections {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            next: AtomicUsize::new(0),
            open: Mutex::default(),
        }
    }
}

impl OpenConnections {
    /// Records a connection just accepted; [`OpenConnections::closed`]
    /// with its number forgets it.
    pub fn opened(&self) -> (usize, Arc<OpenConnection>) {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(OpenConnection::new(self.epoch));
        self.lock().insert(number, connection.clone());
        (number, connection)
    }

    /// Forgets a connection that has closed.
    pub fn closed(&self, number: usize) {
        self.lock().remove(&number);
    }

    /// Tells the connection quiet longest (kept alive with nothing to do,
    /// or sent nothing since it was accepted), if it has been quiet for
    /// [`IDLE_BEFORE_CLOSING`], to close; false when none has.
    pub fn close_one_quiet(&self) -> bool {
        self.close_one_quiet_at(Instant::now())
    }

    fn close_one_quiet_at(&self, now: Instant) -> bool {
        self.lock()
            .values()
            .filter_map(|connection| Some((connection.quiet_for(now)?, connection)))
            .filter(|(quiet, _)| *quiet >= IDLE_BEFORE_CLOSING)
            .max_by_key(|(quiet, _)| *quiet)
            .is_some_and(|(_, connection)| connection.tell_to_close())
    }

    /// Tells every connection quiet for [`IDLE_BEFORE_CLOSING`] (kept alive
    /// with nothing to do, or sent nothing since it was accepted) to close:
    /// a stop, which looks again as connections age.
    pub fn close_quiet(&self) {
        self.close_quiet_at(Instant::now());
    }

    fn close_quiet_at(&self, now: Instant) {
        for connection in self.lock().values() {
            if connection
                .quiet_for(now)
                .is_some_and(|quiet| quiet >= IDLE_BEFORE_CLOSING)
            {
                connection.tell_to_close();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Arc<OpenConnection>>> {
        // The map is whole after any panic: each step is one insert or remove.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{IDLE_BEFORE_CLOSING, OpenConnection, OpenConnections};

    fn told(connection: &OpenConnection) -> bool {
        connection.told.load(std::sync::atomic::Ordering::Acquire)
    }

    fn later() -> Instant {
        Instant::now() + IDLE_BEFORE_CLOSING + Duration::from_millis(100)
    }

    #[test]
    fn only_a_connection_quiet_for_a_while_is_closed_for_a_waiting_client() {
        let open = OpenConnections::default();
        let (_, fresh) = open.opened();
        assert!(
            !open.close_one_quiet(),
            "just accepted: its client may be sending its first request"
        );
        let in_flight = fresh.handling();
        assert!(!open.close_one_quiet_at(later()), "a request is in flight");
        drop(in_flight);
        assert!(
            !open.close_one_quiet(),
            "just answered: its client may be sending the next request"
        );
        assert!(open.close_one_quiet_at(later()), "answered, and idle a while since");
        assert!(
            !open.close_one_quiet_at(later()),
            "told once, and counted for one waiting client"
        );
        let (_, silent) = open.opened();
        assert!(
            open.close_one_quiet_at(later()),
            "sent nothing for a while since it was accepted"
        );
        assert!(told(&silent));
    }

    #[test]
    fn the_connection_idle_longest_is_closed_first_and_each_once() {
        let open = OpenConnections::default();
        let (_, first) = open.opened();
        let (_, second) = open.opened();
        drop(first.handling());
        std::thread::sleep(Duration::from_millis(20));
        drop(second.handling());
        assert!(open.close_one_quiet_at(later()));
        assert!(told(&first), "idle longest");
        assert!(!told(&second));
        assert!(
            open.close_one_quiet_at(later()),
            "the other, for a second waiting client"
        );
        assert!(told(&second));
    }

    #[test]
    fn a_stop_closes_only_connections_quiet_for_a_while_whether_answered_or_not() {
        let open = OpenConnections::default();
        let (_, silent) = open.opened();
        let (_, answered) = open.opened();
        drop(answered.handling());
        let (_, in_flight) = open.opened();
        let _request = in_flight.handling();
        open.close_quiet();
        assert!(
            !told(&silent),
            "just accepted: its client may be sending its first request"
        );
        assert!(
            !told(&answered),
            "just answered: its client may be sending the next request"
        );
        open.close_quiet_at(later());
        assert!(told(&silent));
        assert!(told(&answered));
        assert!(!told(&in_flight), "its answer will say it closes");
    }

    #[test]
    fn a_closed_connection_is_forgotten() {
        let open = OpenConnections::default();
        let (number, connection) = open.opened();
        drop(connection.handling());
        open.closed(number);
        assert!(!open.close_one_quiet_at(later()));
    }
}
