//! The connections `serve` holds open, so that it can close one kept alive
//! with nothing to do when a client waits at the connection cap, and all of
//! them at a stop.
//!
//! A kept-alive connection with no request in flight gave up its slot only
//! at the read timeout (30 s): at the cap, with every slot held by idle
//! connections of callers' pools, a client waiting (a liveness probe) waited
//! that long. Closing an idle kept-alive connection is what HTTP/1.1 lets a
//! server do at any time, and clients reopen one when they need it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// One open connection, as the serve loop sees it.
#[derive(Default)]
pub struct OpenConnection {
    /// Requests of this connection being handled (at most one: HTTP/1.1
    /// answers in order).
    handling: AtomicUsize,
    /// Whether it has been answered at least once: one that has not may be
    /// a client about to send its first request, and is left alone.
    answered: AtomicBool,
    /// Whether it has been told to close: not told twice, nor counted twice
    /// for two waiting clients.
    told: AtomicBool,
    /// Wakes the connection's task to close it, after the request in
    /// flight, if any, is answered.
    close: Notify,
}

impl OpenConnection {
    /// Marks a request of this connection in flight until the guard drops.
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

    /// Kept alive, answered, with nothing in flight, and not told to close.
    fn is_idle(&self) -> bool {
        self.answered.load(Ordering::Acquire)
            && self.handling.load(Ordering::Acquire) == 0
            && !self.told.load(Ordering::Acquire)
    }
}

/// A request in flight on an [`OpenConnection`]; dropped once it is answered.
pub struct Handling(Arc<OpenConnection>);

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.answered.store(true, Ordering::Release);
        self.0.handling.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every connection open, by a number of its own.
#[derive(Default)]
pub struct OpenConnections {
    next: AtomicUsize,
    open: Mutex<HashMap<usize, Arc<OpenConnection>>>,
}

impl OpenConnections {
    /// Records a connection just accepted; [`OpenConnections::closed`]
    /// with its number forgets it.
    pub fn opened(&self) -> (usize, Arc<OpenConnection>) {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(OpenConnection::default());
        self.lock().insert(number, connection.clone());
        (number, connection)
    }

    /// Forgets a connection that has closed.
    pub fn closed(&self, number: usize) {
        self.lock().remove(&number);
    }

    /// Tells one idle kept-alive connection to close ([`OpenConnection::is_idle`]);
    /// false when none is idle.
    pub fn close_one_idle(&self) -> bool {
        self.lock()
            .values()
            .find(|connection| connection.is_idle())
            .is_some_and(|connection| connection.tell_to_close())
    }

    /// Tells every connection to close once its request in flight, if any,
    /// is answered (a stop).
    pub fn close_all(&self) {
        for connection in self.lock().values() {
            connection.tell_to_close();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Arc<OpenConnection>>> {
        // The map is whole after any panic: each step is one insert or remove.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::OpenConnections;

    #[test]
    fn only_an_answered_connection_with_nothing_in_flight_is_closed_for_a_waiting_client() {
        let open = OpenConnections::default();
        let (_, fresh) = open.opened();
        assert!(!open.close_one_idle(), "a connection not yet answered is left alone");
        let in_flight = fresh.handling();
        assert!(!open.close_one_idle(), "a request is in flight");
        drop(in_flight);
        assert!(open.close_one_idle(), "answered, and idle since");
        assert!(!open.close_one_idle(), "told once, and counted for one waiting client");
    }

    #[test]
    fn a_closed_connection_is_forgotten() {
        let open = OpenConnections::default();
        let (number, connection) = open.opened();
        drop(connection.handling());
        open.closed(number);
        assert!(!open.close_one_idle());
    }
}
