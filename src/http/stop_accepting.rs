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
//! Linux a socket filter that drops every packet shuts the door: a new
//! client's SYN is dropped, so it never connects, and is refused once the
//! listener closes; clients already queued are sockets of their own, which
//! the filter does not reach.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

/// Keeps new clients out of `listener`'s queue from now on; false where
/// this system cannot (then clients that keep coming are taken until the
/// queue is found empty or the grace is over).
pub fn refuse_new_clients(listener: &TcpListener) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // Classic BPF, one instruction: `ret #0`, keep 0 bytes of every
        // packet, i.e. drop it.
        const DROP_EVERY_PACKET: socket2::SockFilter = socket2::SockFilter::new(0x06, 0, 0, 0);
        match socket2::SockRef::from(listener).attach_filter(&[DROP_EVERY_PACKET]) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(error = %error, "cannot keep new clients out at the stop: {error}; clients that keep coming are served until the grace is over");
                false
            }
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = listener;
        false
    }
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
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn clients_queued_before_are_taken_with_what_they_sent_and_none_after() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for number in 0..3u8 {
            let mut client = TcpStream::connect(address).await.unwrap();
            client.write_all(&[number]).await.unwrap();
            queued.push(client);
        }
        let door_shut = refuse_new_clients(&listener);
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

    #[tokio::test]
    async fn none_is_waiting_in_an_empty_queue() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(take_waiting(&listener).unwrap().is_none());
    }
}
