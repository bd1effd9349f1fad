//! The listener at a stop: new clients are kept out, and the ones already
//! queued (connected, and perhaps with their request sent) are taken.
//!
//! Closing the listener resets every client still in its accept queue, so a
//! stop first takes and answers those (review BT). "Until the queue is
//! empty" has an end only if no client can join it: clients that reconnect
//! as soon as an answer says `Connection: close` kept it full, and a stop at
//! the connection cap served them for its whole grace (review BV); counting
//! the queue at the signal instead reset every client that joined while the
//! counted ones were served, after it had sent its request (review BW). On
//! Linux a socket filter on the listener shuts the door: it drops a new
//! client's SYN, so that client never connects, and is refused once the
//! listener closes. It drops nothing else: a client whose handshake was
//! under way at the signal has our SYN-ACK and may have sent its request
//! with its ACK, and is let in (review BX: a filter dropping every packet
//! reset it); clients already queued are sockets of their own, which the
//! filter does not reach.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// How long, from the signal, a stop waits for the handshakes under way at
/// the signal to complete: a client's ACK comes a round trip after our
/// SYN-ACK. A client further away than this is reset with the listener.
pub const HANDSHAKES_UNDER_WAY: Duration = Duration::from_millis(250);

/// Keeps new clients out of `listener`'s queue from now on; false where
/// this system cannot (then clients that keep coming are taken until the
/// queue is found empty after [`HANDSHAKES_UNDER_WAY`], or the grace is over).
pub fn refuse_new_clients(listener: &TcpListener) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    match drop_new_clients_first_segments(socket2::SockRef::from(listener)) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(error = %error, "cannot keep new clients out at the stop: {error}; clients are taken until none is waiting or the grace is over");
            false
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = listener;
        false
    }
}

/// Attaches to `socket` a filter that drops every segment with SYN set and
/// ACK clear, a new client's first, and keeps every other whole.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn drop_new_clients_first_segments(socket: socket2::SockRef<'_>) -> std::io::Result<()> {
    use socket2::SockFilter;
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    // Classic BPF over the TCP header, where a TCP socket's filter starts.
    const PROGRAM: [SockFilter; 5] = [
        SockFilter::new(0x30, 0, 0, 13),        // ldb [13]: the flags byte
        SockFilter::new(0x54, 0, 0, SYN | ACK), // and #(SYN | ACK)
        SockFilter::new(0x15, 0, 1, SYN),       // jeq #SYN: next, else skip it
        SockFilter::new(0x06, 0, 0, 0),         // ret #0: drop
        SockFilter::new(0x06, 0, 0, u32::MAX),  // ret #-1: keep all
    ];
    socket.attach_filter(&PROGRAM)
}

/// The next client waiting in `listener`'s queue, or None when none is.
///
/// Asks the system itself rather than awaiting tokio's `accept`, whose
/// readiness is as of the runtime's last look: a client queued since would
/// be taken for none and reset with the listener.
pub fn take_waiting(listener: &TcpListener) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
    let (socket, peer) = match socket2::SockRef::from(listener).accept() {
        Ok(accepted) => accepted,
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
        Err(error) => return Err(error),
    };
    let stream = std::net::TcpStream::from(socket);
    stream.set_nonblocking(true)?;
    let peer = peer
        .as_socket()
        .ok_or_else(|| std::io::Error::other("a TCP listener took a client without an IP address"))?;
    Ok(Some((TcpStream::from_std(stream)?, peer)))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn clients_queued_before_are_taken_with_what_they_sent_and_none_after() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..3u8 {
            queued.push(TcpStream::connect(address).await.unwrap());
        }
        let door_shut = refuse_new_clients(&listener);
        // Sent after the door shut: a queued client's request gets through.
        for (number, client) in (0u8..).zip(&mut queued) {
            client.write_all(&[number]).await.unwrap();
        }
        let late = tokio::spawn(async move { TcpStream::connect(address).await });
        // A late client's SYN is dropped: it is not connected, nor queued.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if cfg!(target_os = "linux") {
            assert!(door_shut);
            assert!(!late.is_finished(), "{:?}", late.await);
        }
        for number in 0..3u8 {
            let (mut taken, _) = take_waiting(&listener).unwrap().expect("a queued client");
            let mut sent = [0u8];
            taken.read_exact(&mut sent).await.unwrap();
            assert_eq!(sent, [number]);
        }
        if cfg!(target_os = "linux") {
            assert!(take_waiting(&listener).unwrap().is_none());
            drop(listener);
            // Its SYN sent again finds no listener.
            let refused = tokio::time::timeout(Duration::from_secs(5), late)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(refused.unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
        }
    }

    /// The other half of the filter: what a client sends once connected
    /// (every segment with ACK set) gets through. A client whose handshake
    /// was under way at the signal becomes a socket under the listener's
    /// filter; one dropping every packet reset it (review BX). Loopback
    /// cannot hold a handshake half done, so the filter is tried on a
    /// connected socket instead.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[tokio::test]
    async fn the_filter_lets_through_what_a_connected_client_sends() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server_side, _) = listener.accept().await.unwrap();
        drop_new_clients_first_segments(socket2::SockRef::from(&server_side)).unwrap();
        client.write_all(b"GET").await.unwrap();
        let mut sent = [0u8; 3];
        tokio::time::timeout(Duration::from_secs(5), server_side.read_exact(&mut sent))
            .await
            .expect("the client's bytes within 5 s")
            .unwrap();
        assert_eq!(&sent, b"GET");
    }

    #[tokio::test]
    async fn none_is_waiting_in_an_empty_queue() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(take_waiting(&listener).unwrap().is_none());
    }
}
