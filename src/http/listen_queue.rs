//! How many clients wait in a listener's accept queue: connected (the
//! kernel completed the handshake, and they may have sent a request) but not
//! yet taken by `accept`.
//!
//! A stop takes and answers the clients queued when it was asked for, then
//! closes the listener (review BT). "Until the queue is empty" is not that
//! bound: clients that reconnect as soon as an answer says
//! `Connection: close` keep the queue full, and at the connection cap a
//! stop then served new clients for its whole grace and reset the requests
//! in flight at its end (review BV). The count read at the signal is.
//!
//! Linux shows it as the `rx_queue` of the listening socket's line in
//! `/proc/net/tcp` (or `tcp6`), found by the socket's inode (what `ss -lnt`
//! shows as `Recv-Q`). Elsewhere, or when `/proc` cannot be read, the
//! count is unknown.

use std::path::Path;

/// Clients waiting in `listener`'s accept queue, if this system says.
pub fn waiting(listener: &tokio::net::TcpListener) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt as _;
        use std::os::unix::io::AsRawFd as _;
        // The descriptor's link leads to the socket's inode.
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
            .ok()?
            .ino();
        ["/proc/net/tcp", "/proc/net/tcp6"]
            .into_iter()
            .find_map(|table| waiting_in_table(Path::new(table), inode))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = listener;
        None
    }
}

/// The `rx_queue` of the socket `inode` in the table at `path`, if listed.
fn waiting_in_table(path: &Path, inode: u64) -> Option<u64> {
    let table = std::fs::read_to_string(path).ok()?;
    table.lines().skip(1).find_map(|line| waiting_in_line(line, inode))
}

/// One line of `/proc/net/tcp`: `sl local remote st tx_queue:rx_queue tr:when
/// retransmits uid timeout inode …`; the queues in hex. For a listening
/// socket `rx_queue` is its accept queue's length.
fn waiting_in_line(line: &str, inode: u64) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.get(9)?.parse::<u64>().ok()? != inode {
        return None;
    }
    let (_, rx_queue) = fields.get(4)?.split_once(':')?;
    u64::from_str_radix(rx_queue, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_gives_its_receive_queue_for_its_own_inode_only() {
        let line = "   1: 0100007F:B8A1 00000000:0000 0A 00000000:0000001F 00:00000000 00000000     0        0 4242 1 \
                    0000000000000000 100 0 0 10 0";
        assert_eq!(waiting_in_line(line, 4242), Some(31));
        assert_eq!(waiting_in_line(line, 4243), None);
        assert_eq!(waiting_in_line("  sl  local_address rem_address   st", 4242), None);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn clients_connected_and_not_yet_accepted_are_counted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert_eq!(waiting(&listener), Some(0));
        let address = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(tokio::net::TcpStream::connect(address).await.unwrap());
        }
        assert_eq!(waiting(&listener), Some(3));
        let _taken = listener.accept().await.unwrap();
        assert_eq!(waiting(&listener), Some(2));
    }
}
