//! The `serve` process as a service manager and an operator see it: the
//! signals it answers and how long it takes to stop.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::both;
use crate::helpers::{ServeProcess, TestApp, batch_at, days_ago, faketime_library, metric};

both!(
    a_hangup_is_ignored_and_a_client_that_never_finishes_cannot_hold_the_shutdown,
    a_server_error_is_logged_once_with_its_request,
    every_row_is_stamped_by_the_process_clock_whatever_the_database_server_reads,
    no_job_run_starts_after_the_stop_signal_while_requests_finish,
    a_connection_that_sends_no_whole_head_within_the_read_timeout_is_closed,
    a_body_that_does_not_arrive_within_the_read_timeout_is_answered_408_and_writes_nothing,
    a_client_that_reads_no_answer_loses_its_connection_after_the_read_timeout,
    a_client_that_reads_a_large_answer_slowly_gets_all_of_it,
    a_client_past_max_connections_waits_until_one_closes_then_is_served,
    a_connection_cap_past_the_open_file_limit_is_lowered_to_fit_with_a_warning,
    busy_kept_alive_clients_at_the_cap_let_a_waiting_client_in,
    an_idle_kept_alive_connection_at_the_cap_is_closed_for_a_waiting_client,
    a_silent_connection_at_the_cap_is_closed_for_a_waiting_client,
    a_connection_is_quiet_from_its_accept_not_from_the_servers_start,
    a_half_sent_first_head_at_the_cap_does_not_keep_a_waiting_client_out,
    a_stop_answers_the_clients_waiting_at_the_cap_and_in_the_listen_queue,
    a_client_waiting_at_the_cap_cannot_hold_a_stop_past_the_grace,
    a_connection_writing_a_large_answer_is_not_taken_for_idle,
    serve_goes_on_when_its_log_lines_cannot_be_written,
    a_stop_answers_every_request_busy_kept_alive_clients_send,
    a_stop_closes_quiet_connections_without_waiting_for_the_grace,
    a_stop_does_not_serve_clients_that_keep_reconnecting_until_its_grace_is_over,
    a_stop_closes_an_idle_connection_for_the_client_waiting_at_the_cap,
);

/// Sends `serve` the head of an authorised POST and the first bytes of its
/// 100-byte body, never the rest; returns the connection (to keep it open)
/// and the log line saying the request is in flight (its headers read;
/// tower_http logs it at debug), if it came within 10 s.
async fn start_a_post_that_never_finishes(
    serve: &mut ServeProcess,
    admin_key: &str,
) -> (std::net::TcpStream, Option<String>) {
    let mut slow = std::net::TcpStream::connect(serve.socket_addr()).unwrap();
    // Authorised, so that the handler waits for the body (a 401 reads none).
    let head = format!(
        "POST /v1/entries HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer {admin_key}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"account\": "
    );
    slow.write_all(head.as_bytes()).unwrap();
    let in_flight = serve
        .wait_for_stderr("method=POST path=/v1/entries", Duration::from_secs(10))
        .await;
    (slow, in_flight)
}

/// `tally serve --read-timeout 1` on `app`'s database with the admin key
/// `admin_key`, and the address it listens on.
async fn serve_with_a_one_second_read_timeout(app: &TestApp, admin_key: &str) -> (ServeProcess, std::net::SocketAddr) {
    let serve = ServeProcess::start(
        &app.database_url,
        &["--no-jobs", "--read-timeout", "1"],
        &[
            ("TALLY_ADMIN_KEY", admin_key),
            // Debug: a connection's end is logged at debug.
            ("RUST_LOG", "info,tally::http=debug,sqlx=warn,tokio_cron_scheduler=warn"),
        ],
    )
    .await;
    let address = serve.socket_addr();
    (serve, address)
}

/// Reads from `stream` until the server closes it (or `limit` passes);
/// returns what was read and whether it closed.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

/// Review AW: a client that sends its head a byte at a time (slowloris), or
/// nothing after its first request, kept its connection for ever, and a
/// few hundred such took every file descriptor. `--read-timeout` bounds both.
async fn a_connection_that_sends_no_whole_head_within_the_read_timeout_is_closed(app: TestApp) {
    use tokio::io::AsyncWriteExt as _;
    let (serve, host) = serve_with_a_one_second_read_timeout(&app, "tly_read_timeout_admin_key").await;

    // A head sent a byte every 200 ms, never finished.
    let mut slow = tokio::net::TcpStream::connect(host).await.unwrap();
    let started = Instant::now();
    let mut closed = false;
    for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
        if slow.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if started.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    if !closed {
        closed = read_until_closed(&mut slow, Duration::from_secs(1)).await.1;
    }
    assert!(
        closed,
        "a head trickled for {:?} kept its connection",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        started.elapsed()
    );

    // A kept-alive connection with nothing more to say.
    let mut idle = tokio::net::TcpStream::connect(host).await.unwrap();
    idle.write_all(HEALTH).await.unwrap();
    let started = Instant::now();
    let (answer, closed) = read_until_closed(&mut idle, Duration::from_secs(4)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(closed, "an idle connection was kept {:?}", started.elapsed());

    // A client that sends its request at once is served as before.
    let health = reqwest::get(format!("{}/healthz", serve.address())).await.unwrap();
    assert_eq!(health.status(), 200);
}

/// Reads from `stream` until what arrived contains `needle` (or `limit`
/// passes, or the server closes it); returns what was read.
async fn read_until_it_holds(stream: &mut tokio::net::TcpStream, needle: &str, limit: Duration) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Without a cap, clients could hold every file descriptor, and the
/// database's connections would fail instead. At `--max-connections` the
/// server stops accepting: a client past it waits in the listen queue,
/// unanswered, until a connection closes, and is then served.
async fn a_client_past_max_connections_waits_until_one_closes_then_is_served(app: TestApp) {
    use tokio::io::AsyncWriteExt as _;
    let mut serve = ServeProcess::start(&app.database_url, &["--no-jobs", "--max-connections", "2"], &[]).await;
    let address = serve.socket_addr();
    let first = tokio::net::TcpStream::connect(address).await.unwrap();
    let _second = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut third = tokio::net::TcpStream::connect(address).await.unwrap();
    third.write_all(HEALTH).await.unwrap();
    // Logged once the server takes a third client and has no slot for it.
    let full = serve
        .wait_for_stderr("at the cap of 2 open connections", Duration::from_secs(10))
        .await;
    assert!(full.is_some(), "no warning at the cap:\n{}", serve.stderr());
    assert!(full.unwrap().contains("max_connections=2"), "{}", serve.stderr());
    // Within a second of their start neither silent connection is closed
    // for it (see the next test).
    let early = read_until_it_holds(&mut third, "HTTP/1.1", Duration::from_millis(500)).await;
    assert!(early.is_empty(), "answered past the cap: {early}");

    drop(first);
    let answer = read_until_it_holds(&mut third, "\r\n\r\n", Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "once a slot was free: {answer:?}");

    // The gauge counts the silent second connection and this one.
    third
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let metrics = read_until_it_holds(&mut third, "# EOF", Duration::from_secs(5)).await;
    assert_eq!(metric(&metrics, "tally_http_connections_open"), Some(2), "{metrics}");

    // Waiting for a slot does not hold up a stop: the quiet connections are
    // closed and the process ends (review BN: a mutant that waited
    // for a slot before looking at the stop went untested). A fourth client
    // puts the server back to waiting for a slot.
    let _fourth = tokio::net::TcpStream::connect(address).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_within(&mut serve, Duration::from_secs(5)).await;
}

/// Sends `serve` SIGTERM and asserts that it exits 0 within `limit`.
async fn stop_within(serve: &mut ServeProcess, limit: Duration) {
    let asked = Instant::now();
    serve.terminate();
    let status = serve.wait_for_exit(limit + Duration::from_secs(10)).await;
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}: {}", serve.stderr());
    assert!(took < limit, "stopped after {took:?}: {}", serve.stderr());
}

/// Review BO: at the cap, kept-alive clients that kept sending held every
/// slot for as long as they sent, and a client waiting (a liveness probe on
/// `/healthz`) got no answer until they stopped. While one waits, the next
/// answer now closes its connection, which frees a slot. Every request sent
/// is answered: review BR saw the idle close pick such a client between two
/// requests and drop the one it had just sent.
async fn busy_kept_alive_clients_at_the_cap_let_a_waiting_client_in(app: TestApp) {
    use tokio::io::AsyncWriteExt as _;
    let serve = ServeProcess::start(&app.database_url, &["--no-jobs", "--max-connections", "2"], &[]).await;
    let address = serve.socket_addr();
    // A connection answered and then closed by its client, past the idle
    // time: it must be forgotten, not taken for an idle one to close
    // (review BR: a mutant that kept it let the probe wait for ever).
    let mut gone = tokio::net::TcpStream::connect(address).await.unwrap();
    gone.write_all(HEALTH).await.unwrap();
    let answer = read_until_it_holds(&mut gone, "\r\n\r\n", Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    drop(gone);
    tokio::time::sleep(IDLE_BEFORE_CLOSING).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut busy = Vec::new();
    for _ in 0..2 {
        let client = tokio::net::TcpStream::connect(address).await.unwrap();
        busy.push(tokio::spawn(ask_back_to_back(client, Duration::ZERO, stop.clone())));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    a_probe_is_answered_within_3_s(address).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut closed = 0;
    for client in busy {
        closed += usize::from(client.await.unwrap().is_some());
    }
    // One waiting client, one connection closed (review BP: every answer
    // until the slot was taken closed them all).
    assert_eq!(closed, 1, "busy clients told to close");
}

/// Review BS: a stop closed every kept-alive connection between two
/// requests at once, so a client sending back to back lost the request it
/// had just sent (13 of 16 connections in BS's trials), unanswered, with no
/// way to tell whether it ran. Such clients are now told to close by their
/// next answer (`Connection: close`), and a stop closes only connections
/// quiet for a second.
async fn a_stop_answers_every_request_busy_kept_alive_clients_send(app: TestApp) {
    let mut serve = ServeProcess::start(&app.database_url, &["--no-jobs", "--shutdown-grace", "10"], &[]).await;
    let address = serve.socket_addr();
    let mut busy = Vec::new();
    let never = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for _ in 0..4 {
        let client = tokio::net::TcpStream::connect(address).await.unwrap();
        // 20 ms apart: the stop most likely comes between two requests.
        busy.push(tokio::spawn(ask_back_to_back(
            client,
            Duration::from_millis(20),
            never.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_within(&mut serve, Duration::from_secs(5)).await;
    for client in busy {
        let answered = client.await.unwrap();
        assert!(answered.is_some_and(|answered| answered > 1), "{answered:?}");
    }
}

/// Sends [`HEALTH`] on `client` request after request, `pause` before each,
/// asserting that each is answered, until an answer says it closes the
/// connection (returns how many were answered) or `done` is set (None).
async fn ask_back_to_back(
    mut client: tokio::net::TcpStream,
    pause: Duration,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> Option<usize> {
    use tokio::io::AsyncWriteExt as _;
    for answered in 1.. {
        if done.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        tokio::time::sleep(pause).await;
        client.write_all(HEALTH).await.expect("a request is sent");
        let answer = read_until_it_holds(&mut client, "\r\n\r\n", Duration::from_secs(5)).await;
        assert!(
            answer.starts_with("HTTP/1.1 "),
            "request {answered} was sent and never answered: {answer:?}"
        );
        if answer.to_ascii_lowercase().contains("connection: close") {
            return Some(answered);
        }
    }
    unreachable!("an unbounded range")
}

/// Starts `serve` with one connection slot, a read timeout of
/// `read_timeout` seconds and a grace of `grace`.
async fn serve_with_one_slot(app: &TestApp, read_timeout: u64, grace: u64) -> ServeProcess {
    let (read_timeout, grace) = (read_timeout.to_string(), grace.to_string());
    ServeProcess::start(
        &app.database_url,
        &[
            "--no-jobs",
            "--max-connections",
            "1",
            "--read-timeout",
            &read_timeout,
            "--shutdown-grace",
            &grace,
        ],
        &[],
    )
    .await
}

/// A client that has sent [`HEALTH`] to `serve` (started by
/// [`serve_with_one_slot`], its slot taken) and is held at the cap.
async fn hold_a_client_at_the_cap(serve: &mut ServeProcess) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let mut held = tokio::net::TcpStream::connect(serve.socket_addr()).await.unwrap();
    held.write_all(HEALTH).await.unwrap();
    let full = serve
        .wait_for_stderr("at the cap of 1 open connections", Duration::from_secs(10))
        .await;
    assert!(full.is_some(), "{}", serve.stderr());
    held
}

/// Review BT: at a stop, the client held at the cap and the clients the
/// kernel had queued were reset, though each had sent its request. They are
/// now taken and answered (with `Connection: close`) as the stop frees
/// slots, within the grace.
async fn a_stop_answers_the_clients_waiting_at_the_cap_and_in_the_listen_queue(app: TestApp) {
    use tokio::io::AsyncWriteExt as _;
    let mut serve = serve_with_one_slot(&app, 2, 15).await;
    let address = serve.socket_addr();
    // Holds the one slot until the read timeout: hyper waits for the rest
    // of a head, even at a stop.
    let mut half = tokio::net::TcpStream::connect(address).await.unwrap();
    half.write_all(&HEALTH[..20]).await.unwrap();
    // The first is held at the cap, the others in the listen queue.
    let mut waiting = vec![hold_a_client_at_the_cap(&mut serve).await];
    for _ in 0..2 {
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        client.write_all(HEALTH).await.unwrap();
        waiting.push(client);
    }
    stop_within(&mut serve, Duration::from_secs(8)).await;
    for (number, client) in waiting.iter_mut().enumerate() {
        let answer = read_until_it_holds(client, "\r\n\r\n", Duration::from_secs(1)).await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.to_ascii_lowercase().contains("connection: close"),
            "waiting client {number}: {answer:?}"
        );
    }
    assert!(!serve.stderr().contains("stopping without them"), "{}", serve.stderr());
    drop(half);
}

/// Review BV: clients that reconnect as soon as an answer says
/// `Connection: close` (as pools do) kept the listen queue full, and at the
/// cap a stop took them for its whole grace, then reset the requests in
/// flight at its end. Review BW: taking only the clients counted at the
/// signal reset those that joined the queue meanwhile, their requests sent.
/// A stop keeps new clients out (they are refused, nothing sent) and answers
/// every one it let in.
async fn a_stop_does_not_serve_clients_that_keep_reconnecting_until_its_grace_is_over(app: TestApp) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut serve = ServeProcess::start(
        &app.database_url,
        &["--no-jobs", "--max-connections", "2", "--shutdown-grace", "20"],
        &[],
    )
    .await;
    let address = serve.socket_addr();
    let running = Arc::new(AtomicBool::new(true));
    // Ends the clients however the test ends, a failed assertion included.
    struct EndsTheClients(Arc<AtomicBool>);
    impl Drop for EndsTheClients {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Relaxed);
        }
    }
    let clients_end = EndsTheClients(running.clone());
    let answered = Arc::new(AtomicU64::new(0));
    // Requests sent whose connection then ended without an answer.
    let lost = Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (running, answered, lost) = (running.clone(), answered.clone(), lost.clone());
            // Threads: the clients must go on whatever this runtime does.
            std::thread::spawn(move || {
                use std::io::Read as _;
                while running.load(Ordering::Relaxed) {
                    let Ok(mut client) = std::net::TcpStream::connect(address) else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
                    if client.write_all(CLOSING_HEALTH).is_err() {
                        continue;
                    }
                    let mut answer = String::new();
                    match client.read_to_string(&mut answer) {
                        Ok(_) if answer.starts_with("HTTP/1.1 200") => {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        ended => lost.lock().unwrap().push(format!("{ended:?}: {answer:?}")),
                    }
                }
            })
        })
        .collect();
    let full = serve
        .wait_for_stderr("at the cap of 2 open connections", Duration::from_secs(10))
        .await;
    assert!(full.is_some(), "{}", serve.stderr());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(answered.load(Ordering::Relaxed) > 0, "{}", serve.stderr());
    stop_within(&mut serve, Duration::from_secs(5)).await;
    drop(clients_end);
    for client in clients {
        client.join().unwrap();
    }
    assert!(!serve.stderr().contains("stopping without them"), "{}", serve.stderr());
    let lost = lost.lock().unwrap();
    assert!(
        lost.is_empty(),
        "{} requests sent and not answered: {lost:?}",
        lost.len()
    );
}

/// Review BV: a client held at the cap through a stop, behind a connection
/// kept alive and idle, is answered once that one has been quiet a second;
/// it was reset at the end of the grace when the stop did not look for
/// quiet connections while the client waited.
async fn a_stop_closes_an_idle_connection_for_the_client_waiting_at_the_cap(app: TestApp) {
    use tokio::io::AsyncWriteExt as _;
    let mut serve = serve_with_one_slot(&app, 60, 20).await;
    let address = serve.socket_addr();
    let mut idle = tokio::net::TcpStream::connect(address).await.unwrap();
    idle.write_all(HEALTH).await.unwrap();
    let answer = read_until_it_holds(&mut idle, "\r\n\r\n", Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let mut held = hold_a_client_at_the_cap(&mut serve).await;
    // Before the idle one has been quiet a second: the stop must close it.
    let asked = Instant::now();
    serve.terminate();
    let answer = read_until_it_holds(&mut held, "\r\n\r\n", Duration::from_secs(5)).await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && asked.elapsed() < Duration::from_secs(3),
        "after {:?}: {answer:?}: {}",
        asked.elapsed(),
        serve.stderr()
    );
    let status = serve.wait_for_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}: {}", serve.stderr());
    assert!(!serve.stderr().contains("stopping without them"), "{}", serve.stderr());
}

/// A client held at the cap through a stop waits for a slot within the
/// grace only: here the slot's holder keeps it for the 60 s read timeout.
async fn a_client_waiting_at_the_cap_cannot_hold_a_stop_past_the_grace(app: TestApp) {
    use tokio::io::AsyncWriteExt as _;
    let mut serve = serve_with_one_slot(&app, 60, 2).await;
    let address = serve.socket_addr();
    let mut half = tokio::net::TcpStream::connect(address).await.unwrap();
    half.write_all(&HEALTH[..20]).await.unwrap();
    let _held = hold_a_client_at_the_cap(&mut serve).await;
    // Within the grace counted from the signal, not a second grace after
    // the wait for a slot (review BV: 6 s for a grace of 3).
    stop_within(&mut serve, Duration::from_secs(3)).await;
    assert!(serve.stderr().contains("stopping without them"), "{}", serve.stderr());
}

/// A stop closes a kept-alive connection with nothing to do, and one that
/// has sent nothing yet, once quiet for a second: neither holds the stop
/// until the read timeout or the grace.
async fn a_stop_closes_quiet_connections_without_waiting_for_the_grace(app: TestApp) {
    use tokio::io::AsyncWriteExt as _;
    let mut serve = ServeProcess::start(
        &app.database_url,
        &["--no-jobs", "--shutdown-grace", "20", "--read-timeout", "60"],
        &[],
    )
    .await;
    let address = serve.socket_addr();
    let mut kept_alive = tokio::net::TcpStream::connect(address).await.unwrap();
    kept_alive.write_all(HEALTH).await.unwrap();
    let answer = read_until_it_holds(&mut kept_alive, "\r\n\r\n", Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let mut silent = tokio::net::TcpStream::connect(address).await.unwrap();
    stop_within(&mut serve, Duration::from_secs(5)).await;
    assert!(!serve.stderr().contains("stopping without them"), "{}", serve.stderr());
    for stream in [&mut kept_alive, &mut silent] {
        let (answer, closed) = read_until_closed(stream, Duration::from_secs(1)).await;
        assert_eq!((answer.as_str(), closed), ("", true));
    }
}

/// The request most serve tests here send.
const HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
/// [`HEALTH`] from a client that closes after its answer.
const CLOSING_HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// How long a kept-alive connection must be idle before `serve` closes it
/// for a waiting client (src/http/open_connections.rs), and a little more.
const IDLE_BEFORE_CLOSING: Duration = Duration::from_millis(1200);

/// At the cap, a connection kept alive with no request in flight held its
/// slot until the read timeout, so with every slot held by callers' idle
/// pooled connections a client waiting (a probe) waited that long (30 s by
/// default). The connection idle longest is now closed for it at once, and
/// only one; one with a request in flight is not idle, however long ago its
/// last answer was (review BR).
async fn an_idle_kept_alive_connection_at_the_cap_is_closed_for_a_waiting_client(app: TestApp) {
    use tokio::io::AsyncWriteExt as _;
    let admin_key = "tly_idle_close_admin_key";
    let serve = ServeProcess::start(
        &app.database_url,
        &["--no-jobs", "--max-connections", "2", "--read-timeout", "60"],
        &[("TALLY_ADMIN_KEY", admin_key)],
    )
    .await;
    let address = serve.socket_addr();
    // Answered first, then sends a request whose body stays half sent.
    let mut in_flight = tokio::net::TcpStream::connect(address).await.unwrap();
    in_flight.write_all(HEALTH).await.unwrap();
    let answer = read_until_it_holds(&mut in_flight, "\r\n\r\n", Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let body = r#"{"account": "idle", "resource": "api_requests", "amount": "1", "idempotency_key": "in-flight"}"#;
    let head = format!(
        "POST /v1/entries HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin_key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    in_flight.write_all(head.as_bytes()).await.unwrap();
    in_flight.write_all(&body.as_bytes()[..10]).await.unwrap();
    // Its bytes read well before the idle one's answer, so that it would be
    // the one idle longest were its request in flight not counted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Answered last, and idle since.
    let mut idle = tokio::net::TcpStream::connect(address).await.unwrap();
    idle.write_all(HEALTH).await.unwrap();
    let answer = read_until_it_holds(&mut idle, "\r\n\r\n", Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // The probe comes before the idle one has been idle a second, and there
    // is no next answer to close a connection: it is closed once it has been
    // (review BS: the probe waited the read timeout, 60 s here).
    tokio::time::sleep(Duration::from_millis(300)).await;

    a_probe_is_answered_within_3_s(address).await;
    // The idle one was closed: a write may still succeed, its read ends.
    let _ = idle.write_all(HEALTH).await;
    let answer = read_until_it_holds(&mut idle, "\r\n\r\n", Duration::from_secs(5)).await;
    assert_eq!(answer, "", "the idle connection was closed");
    // The one with a request in flight was not: its request is answered.
    in_flight.write_all(&body.as_bytes()[10..]).await.unwrap();
    let answer = read_until_it_holds(&mut in_flight, "\r\n\r\n", Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(app.count_entries().await, 1);
}

/// At the cap, connections that have sent nothing (a pool's opened ahead of
/// need) were left alone, so with every slot held by such a client waited
/// until the read timeout (60 s here). The one silent longest is now closed
/// for it once silent a second, as an idle kept-alive one is.
async fn a_silent_connection_at_the_cap_is_closed_for_a_waiting_client(app: TestApp) {
    use tokio::io::AsyncWriteExt as _;
    let serve = ServeProcess::start(
        &app.database_url,
        &["--no-jobs", "--max-connections", "2", "--read-timeout", "60"],
        &[],
    )
    .await;
    let address = serve.socket_addr();
    let mut older = tokio::net::TcpStream::connect(address).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut newer = tokio::net::TcpStream::connect(address).await.unwrap();
    a_probe_is_answered_within_3_s(address).await;
    // The one silent longest was closed; the other still serves.
    let (answer, closed) = read_until_closed(&mut older, Duration::from_secs(1)).await;
    assert_eq!((answer.as_str(), closed), ("", true));
    newer.write_all(HEALTH).await.unwrap();
    let answer = read_until_it_holds(&mut newer, "\r\n\r\n", Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// Review BT: a connection's quiet time counted from the server's start
/// rather than its accept would have it closed at once for a waiting client,
/// its first request, sent half a second later, lost. The tests above connect
/// right after the start, where the two are about the same.
async fn a_connection_is_quiet_from_its_accept_not_from_the_servers_start(app: TestApp) {
    use tokio::io::AsyncWriteExt as _;
    let serve = ServeProcess::start(&app.database_url, &["--no-jobs", "--max-connections", "2"], &[]).await;
    let address = serve.socket_addr();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut clients = [
        tokio::net::TcpStream::connect(address).await.unwrap(),
        tokio::net::TcpStream::connect(address).await.unwrap(),
    ];
    let probe = tokio::spawn(a_probe_is_answered_within_3_s(address));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for client in &mut clients {
        client.write_all(HEALTH).await.unwrap();
    }
    for client in &mut clients {
        let answer = read_until_it_holds(client, "\r\n\r\n", Duration::from_secs(5)).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "a first request was lost: {answer:?}"
        );
    }
    probe.await.unwrap();
}

/// Review BT: at the cap, a connection with half of its first head sent
/// looked quiet longest and was told to close for a waiting client, but
/// hyper keeps such a connection for the rest of its head: the client waited
/// the read timeout (18.5 s) though another connection was idle. The next
/// quiet one is now closed when the first has not gone a quarter second on;
/// the half-sent request is still answered when its rest comes.
async fn a_half_sent_first_head_at_the_cap_does_not_keep_a_waiting_client_out(app: TestApp) {
    use tokio::io::AsyncWriteExt as _;
    let serve = ServeProcess::start(
        &app.database_url,
        &["--no-jobs", "--max-connections", "2", "--read-timeout", "20"],
        &[],
    )
    .await;
    let address = serve.socket_addr();
    let mut half = tokio::net::TcpStream::connect(address).await.unwrap();
    half.write_all(&HEALTH[..20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut idle = tokio::net::TcpStream::connect(address).await.unwrap();
    idle.write_all(HEALTH).await.unwrap();
    let answer = read_until_it_holds(&mut idle, "\r\n\r\n", Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    a_probe_is_answered_within_3_s(address).await;
    let (answer, closed) = read_until_closed(&mut idle, Duration::from_secs(1)).await;
    assert_eq!((answer.as_str(), closed), ("", true), "the idle one was closed");
    half.write_all(&HEALTH[20..]).await.unwrap();
    let answer = read_until_it_holds(&mut half, "\r\n\r\n", Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// Review BQ: tracing reported a log line stderr refused (a full disk under
/// the log file) with `eprintln!`, which panics when stderr fails: `serve`
/// died at its first log line. Such lines are now dropped, and requests,
/// each of which logs at debug, are answered.
async fn serve_goes_on_when_its_log_lines_cannot_be_written(app: TestApp) {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--listen", "127.0.0.1:0", "--no-jobs"])
        .env("TALLY_DATABASE_URL", &app.database_url)
        .env("TALLY_ADMIN_KEY", "full-log-admin")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(full)
        .kill_on_drop(true)
        .spawn()
        .expect("tally serve starts");
    // Its own log, which names the port, cannot be read: the kernel's can
    // (review BR: a port picked beforehand could be taken by another test).
    let pid = serve.id().unwrap();
    let mut port = None;
    for _ in 0..100 {
        port = listening_port_of(pid);
        if port.is_some() {
            break;
        }
        assert!(serve.try_wait().unwrap().is_none(), "serve ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let port = port.expect("serve listens within 10 s");
    let client = reqwest::Client::new();
    let address = format!("http://127.0.0.1:{port}");
    let mut health = None;
    for _ in 0..100 {
        if let Ok(answer) = client.get(format!("{address}/healthz")).send().await {
            health = Some(answer.status());
            break;
        }
        assert!(serve.try_wait().unwrap().is_none(), "serve ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(health, Some(reqwest::StatusCode::OK));
    for n in 0..3 {
        let posted = client
            .post(format!("{address}/v1/entries"))
            .bearer_auth("full-log-admin")
            .json(&crate::helpers::entry(
                "acme",
                "api_requests",
                "1",
                &format!("full-log-{n}"),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(posted.status(), 200);
    }
    assert_eq!(app.count_entries().await, 3);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &serve.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(15), serve.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// Asserts that a new client's `GET /healthz` at `address` (a server at its
/// connection cap) is answered 200 within 3 s.
async fn a_probe_is_answered_within_3_s(address: std::net::SocketAddr) {
    use tokio::io::AsyncWriteExt as _;
    let started = Instant::now();
    let mut probe = tokio::net::TcpStream::connect(address).await.unwrap();
    probe.write_all(HEALTH).await.unwrap();
    let answer = read_until_it_holds(&mut probe, "\r\n\r\n", Duration::from_secs(10)).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "a probe waited {:?}: {answer:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

/// The TCP port process `pid` listens on, from /proc (Linux): its sockets'
/// inodes, looked up among the listening sockets of /proc/net/tcp.
fn listening_port_of(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        // sl local_address rem_address st … inode (the tenth field).
        let fields: Vec<&str> = line.split_whitespace().collect();
        let listening = fields.get(3) == Some(&"0A");
        let ours = fields.get(9).is_some_and(|inode| inodes.iter().any(|i| i == inode));
        let port = fields.get(1)?.rsplit_once(':')?.1;
        (listening && ours).then(|| u16::from_str_radix(port, 16).ok())?
    })
}

/// Under a hard open-file limit of 300, `TALLY_MAX_CONNECTIONS=1000` cannot
/// be served: 256 files are kept for the database and reports, so the cap
/// is lowered to 44, and said so (review BN: neither the lowering nor the
/// variable had a test).
async fn a_connection_cap_past_the_open_file_limit_is_lowered_to_fit_with_a_warning(app: TestApp) {
    let mut serve = ServeProcess::start_under(
        &["prlimit", "--nofile=300:300"],
        &app.database_url,
        &["--no-jobs"],
        &[("TALLY_MAX_CONNECTIONS", "1000")],
    )
    .await;
    let warned = serve
        .wait_for_stderr("does not fit the open-file limit", Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no warning:\n{}", serve.stderr()));
    assert!(
        warned.contains("--max-connections 1000 does not fit the open-file limit of 300")
            && warned.contains("serving at most 44 connections at once"),
        "{warned}"
    );
    let health = reqwest::get(format!("{}/healthz", serve.address())).await.unwrap();
    assert_eq!(health.status(), 200);
}

/// Review AY: a client that pipelines requests and reads none of the
/// answers kept its connection, and the answers queued for it, for ever.
async fn a_client_that_reads_no_answer_loses_its_connection_after_the_read_timeout(app: TestApp) {
    use tokio::io::AsyncWriteExt as _;
    let (mut serve, address) = serve_with_a_one_second_read_timeout(&app, "tly_read_timeout_admin_key").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // A small window; the answers (about 1 KiB each) still need to pass
    // the server's own send buffer (up to 4 MiB) before its writes wait.
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(address).await.unwrap();
    let requests = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(20_000);
    // The server stops reading requests once its answers back up, so the
    // sending stops too; it fails once the server gives up.
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.write_all(requests.as_bytes())).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (answers, closed) = read_until_closed(&mut stream, Duration::from_secs(20)).await;
    let answered = answers.matches("HTTP/1.1 200").count();
    assert!(closed, "the connection stayed open ({answered} answers read)");
    assert!(
        answered < 20_000,
        "all {answered} answers were kept for a client that read none"
    );
    let health = reqwest::get(format!("{}/healthz", serve.address())).await.unwrap();
    assert_eq!(health.status(), 200);
    // Review BB: the log says which client, in the message and a field.
    let client = stream.local_addr().unwrap();
    let ended = serve
        .wait_for_stderr(&format!("connection from {client} ended: "), Duration::from_secs(5))
        .await;
    let ended = ended.unwrap_or_else(|| panic!("no log of the connection's end: {}", serve.stderr()));
    assert!(ended.contains("the client took no answer for 1 s"), "{ended}");
    assert!(ended.contains(&format!("peer={client}")), "{ended}");
}

/// Review BS: hyper takes an answer whole and writes it on after the request
/// is done, so a connection still writing a large answer to a slow reader
/// was taken for the one idle longest and closed for a waiting client (which
/// then waited for the whole answer), while an idle one stayed open. Bytes
/// moving keep a connection from being idle.
async fn a_connection_writing_a_large_answer_is_not_taken_for_idle(app: TestApp) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    post_4_mb_of_entries(&app).await;
    let admin_key = "tly_large_answer_admin_key";
    let serve = ServeProcess::start(
        &app.database_url,
        &["--no-jobs", "--max-connections", "2"],
        &[("TALLY_ADMIN_KEY", admin_key)],
    )
    .await;
    let address = serve.socket_addr();
    let mut large = ask_for_the_4_mb_listing(address, admin_key).await;
    // About 80 KB/s: the 4 MB answer takes far longer than the test's probe.
    let reading = tokio::spawn(async move {
        let mut got = 0usize;
        let mut buf = [0u8; 4096];
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            match large.read(&mut buf).await {
                Ok(0) | Err(_) => return (got, true),
                Ok(n) => got += n,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (got, false)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut idle = tokio::net::TcpStream::connect(address).await.unwrap();
    idle.write_all(HEALTH).await.unwrap();
    let answer = read_until_it_holds(&mut idle, "\r\n\r\n", Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    tokio::time::sleep(IDLE_BEFORE_CLOSING).await;
    let started = Instant::now();
    a_probe_is_answered_within_3_s(address).await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the probe waited {:?}: the large answer's connection was taken for idle",
        started.elapsed()
    );
    let _ = idle.write_all(HEALTH).await;
    let answer = read_until_it_holds(&mut idle, "\r\n\r\n", Duration::from_secs(5)).await;
    assert_eq!(answer, "", "the idle connection was closed");
    let (got, closed) = reading.await.unwrap();
    assert!(!closed, "the large answer's connection was closed after {got} bytes");
}

/// Asks `address` for the listing [`post_4_mb_of_entries`] made, on a
/// connection with a small receive buffer (so that the answer goes no faster
/// than it is read); returns the connection, the answer to be read.
async fn ask_for_the_4_mb_listing(address: std::net::SocketAddr, admin_key: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(address).await.unwrap();
    let request = format!(
        "GET /v1/accounts/big/entries?limit=1000 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin_key}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// Posts 1 000 entries of about 4 KB each for account `big`: its listing of
/// 1 000 is an answer of about 4 MB.
async fn post_4_mb_of_entries(app: &TestApp) {
    let padding = "x".repeat(3_900);
    let entries: Vec<serde_json::Value> = (0..1_000)
        .map(|i| {
            serde_json::json!({"account": "big", "resource": "api_requests", "amount": "1",
                "idempotency_key": format!("big-{i}"), "metadata": {"pad": padding}})
        })
        .collect();
    let posted = app.post_entries(serde_json::json!({ "entries": entries })).await;
    assert_eq!(posted.status, 200, "{:?}", posted.body);
}

/// Review AZ: the write stall timeout cut off a client that was reading a
/// large answer steadily but slowly (the kernel woke the waiting write only
/// after megabytes had drained). A stop asked for meanwhile waits for the
/// answer to be sent whole (review BR: no test held the stop's wait for
/// open connections, which alone covers an answer still being written).
async fn a_client_that_reads_a_large_answer_slowly_gets_all_of_it(app: TestApp) {
    use tokio::io::AsyncReadExt as _;
    post_4_mb_of_entries(&app).await;
    let admin_key = "tly_read_timeout_admin_key";
    let (mut serve, address) = serve_with_a_one_second_read_timeout(&app, admin_key).await;
    let mut stream = ask_for_the_4_mb_listing(address, admin_key).await;
    // About 80 KB/s for 3 s, three read timeouts: far slower than the
    // answer (about 4 MB) could go, but never still.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let slow_until = Instant::now() + Duration::from_secs(3);
    let stop_at = Instant::now() + Duration::from_secs(1);
    let mut stop_asked = false;
    while Instant::now() < slow_until {
        if !stop_asked && Instant::now() >= stop_at {
            serve.terminate();
            stop_asked = true;
        }
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no byte for 2 s"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (rest, _) = read_until_closed(&mut stream, Duration::from_secs(20)).await;
    got.extend_from_slice(rest.as_bytes());
    let text = String::from_utf8_lossy(&got);
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .expect("a content-length")
        .parse()
        .unwrap();
    assert!(length > 3_000_000, "{length}");
    assert_eq!(body.len(), length, "the answer was cut off");
    assert!(stop_asked);
    let status = serve.wait_for_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}: {}", serve.stderr());
}

/// Review AW: a body sent a byte now and then held its connection (and the
/// shutdown) for as long as the client liked; it is answered 408 in the
/// contract's format once the read timeout passes, and nothing is written.
async fn a_body_that_does_not_arrive_within_the_read_timeout_is_answered_408_and_writes_nothing(app: TestApp) {
    use tokio::io::AsyncWriteExt as _;
    let admin_key = "tly_read_timeout_admin_key";
    let (_serve, host) = serve_with_a_one_second_read_timeout(&app, admin_key).await;
    let body = format!(
        r#"{{"account": "slow", "resource": "api_requests", "amount": "1", "idempotency_key": "s-1", "occurred_at": "{}T12:00:00Z"}}"#,
        days_ago(1)
    );
    let head = format!(
        "POST /v1/entries HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin_key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body.as_bytes()[..10]).await.unwrap();
    let started = Instant::now();
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "after {:?}: {answer}",
        started.elapsed()
    );
    // At the read timeout (1 s), not 5 s later: the client has been silent,
    // so the 408 is not held back for the rest of the body (review BQ).
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert!(
        answer.contains("the request body came too slowly: 10 bytes of the"),
        "{answer}"
    );
    // The rest arrives late: nothing of it is recorded.
    let _ = stream.write_all(&body.as_bytes()[10..]).await;
    let listed = app.get("/v1/accounts/slow/entries").await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    assert_eq!(listed.body["entries"], serde_json::json!([]), "{:?}", listed.body);

    // Review AY: a steady upload slower than the whole body in one read
    // timeout is not refused: 64 KiB at 32 KiB/s takes 2 s, past the 1 s.
    let padded = format!("{body}{}", " ".repeat(64 * 1024 - body.len()));
    let head = head.replace(
        &format!("Content-Length: {}", body.len()),
        &format!("Content-Length: {}", padded.len()),
    );
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    for chunk in padded.as_bytes().chunks(4096) {
        stream.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(125)).await;
    }
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(
        started.elapsed() > Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""created":1"#), "{answer}");

    // Review BB: what arrived earns time, but never a silence longer than
    // the read timeout. 1 MiB at once earned 64 s more; the client then
    // stalls and is answered after the 1 s read timeout.
    let head = head.replace(
        &format!("Content-Length: {}", padded.len()),
        &format!("Content-Length: {}", 2 * 1024 * 1024),
    );
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![b' '; 1024 * 1024]).await.unwrap();
    let started = Instant::now();
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(30)).await;
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "after {:?}: {answer}",
        started.elapsed()
    );
    assert!(
        answer.contains("the request body came too slowly: 1048576 bytes of the 2097152 announced in 1 s"),
        "the time is read before the drain: {answer}"
    );
}

/// Review AS: from the stop signal on, no scheduled run starts, though the
/// server still waits for a request in flight (a rollup run used to start in
/// the grace, its batch then left at the deadline).
async fn no_job_run_starts_after_the_stop_signal_while_requests_finish(app: TestApp) {
    let admin_key = "tly_serve_test_admin_key";
    let jobs = crate::helpers::rollup_every_second_jobs_dir();
    let mut serve = ServeProcess::start(
        &app.database_url,
        &["--jobs", jobs.path().to_str().unwrap(), "--shutdown-grace", "3"],
        &[
            ("TALLY_ADMIN_KEY", admin_key),
            ("RUST_LOG", "info,sqlx=warn,tokio_cron_scheduler=warn,tower_http=debug"),
        ],
    )
    .await;
    let (slow, in_flight) = start_a_post_that_never_finishes(&mut serve, admin_key).await;
    assert!(in_flight.is_some(), "{}", serve.stderr());
    serve.terminate();
    let stopping = serve
        .wait_for_stderr("shutdown requested", Duration::from_secs(10))
        .await;
    assert!(stopping.is_some(), "{}", serve.stderr());
    // Recorded after the signal, beside the server: no run may fold it.
    let posted = app
        .post_entries(crate::helpers::entry("acme", "api_requests", "1", "after-stop"))
        .await;
    assert_eq!(posted.status, 200, "{:?}", posted.body);
    let status = serve.wait_for_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}: {}", serve.stderr());
    let stderr = serve.stderr();
    let after_signal = &stderr[stderr.find("shutdown requested").unwrap()..];
    assert!(!after_signal.contains("job rollup: folded"), "{stderr}");
    assert_eq!(
        app.daily_total("acme", "api_requests", &days_ago(0)).await,
        0,
        "{stderr}"
    );
    drop(slow);
}

/// SIGHUP (sent by log rotation tools) once killed the server outright, its
/// requests unfinished. And after SIGTERM the server waited for a client that
/// had sent half a body for as long as the client liked; it now stops after
/// `--shutdown-grace` seconds.
async fn a_hangup_is_ignored_and_a_client_that_never_finishes_cannot_hold_the_shutdown(app: TestApp) {
    let admin_key = "tly_serve_test_admin_key";
    let mut serve = ServeProcess::start(
        &app.database_url,
        &["--no-jobs", "--shutdown-grace", "1"],
        // tower_http says at debug when a request's headers are in.
        &[
            ("TALLY_ADMIN_KEY", admin_key),
            ("RUST_LOG", "info,sqlx=warn,tokio_cron_scheduler=warn,tower_http=debug"),
        ],
    )
    .await;
    serve.signal("HUP");
    let ignored = serve.wait_for_stderr("SIGHUP ignored", Duration::from_secs(10)).await;
    assert!(ignored.is_some(), "{}", serve.stderr());
    assert!(serve.is_running(), "{}", serve.stderr());
    let health = reqwest::get(format!("{}/healthz", serve.address())).await.unwrap();
    assert_eq!(health.status(), 200);

    let (slow, in_flight) = start_a_post_that_never_finishes(&mut serve, admin_key).await;
    assert!(
        in_flight.is_some_and(|line| line.contains("started processing request")),
        "{}",
        serve.stderr()
    );
    stop_within(&mut serve, Duration::from_secs(8)).await;
    assert!(serve.stderr().contains("stopping without them"), "{}", serve.stderr());
    drop(slow);
}

/// A 5xx is logged with its cause (the client gets none), once, and with the
/// request it answered: it once named neither method nor path, and
/// tower_http added a second line with only the status.
async fn a_server_error_is_logged_once_with_its_request(app: TestApp) {
    // A total past 64 bits is a 500 on every read of it (invariants.rs).
    let at = format!("{}T12:00:00Z", days_ago(2));
    let posted = app
        .post_entries(batch_at("huge", "api_requests", "999999999999999", 9_224, &at))
        .await;
    assert_eq!(posted.status, 200, "{:?}", posted.body);
    let admin_key = "tly_serve_test_admin_key";
    let mut serve = ServeProcess::start(&app.database_url, &["--no-jobs"], &[("TALLY_ADMIN_KEY", admin_key)]).await;
    let usage = reqwest::Client::new()
        .get(format!("{}/v1/accounts/huge/usage", serve.address()))
        .bearer_auth(admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(usage.status(), 500);
    let logged = serve
        .wait_for_stderr("request failed", Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no error line:\n{}", serve.stderr()));
    assert!(
        logged.contains("ERROR") && logged.contains("method=GET") && logged.contains("path=/v1/accounts/huge/usage"),
        "{logged}"
    );
    assert!(logged.contains("64-bit"), "the cause: {logged}");
    let errors = serve.stderr().lines().filter(|l| l.contains("ERROR")).count();
    assert_eq!(errors, 1, "{}", serve.stderr());
    assert!(serve.stop().await.success());
}

/// `recorded_at` and a plan assignment's stamp come from the process's clock
/// on both engines, as posted entries, override changes, `--as-of` and the
/// rollup lag do. On PostgreSQL consumes and plan assignments took the
/// server's `now()` (review AK): with the two clocks apart, a consume made
/// after a post was recorded before it, and `/healthz` reported years of lag.
/// The server runs ten years ahead here (libfaketime); the database does not.
async fn every_row_is_stamped_by_the_process_clock_whatever_the_database_server_reads(app: TestApp) {
    let Some(faketime) = faketime_library() else {
        return;
    };
    let mut serve = ServeProcess::start(
        &app.database_url,
        &["--no-jobs"],
        &[
            ("TALLY_ADMIN_KEY", "clock-admin"),
            ("LD_PRELOAD", faketime.as_str()),
            ("FAKETIME", "@2036-03-10 12:00:00"),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let send = async |method: reqwest::Method, path: &str, body: Option<serde_json::Value>| {
        let mut request = client
            .request(method, format!("{}{path}", serve.address()))
            .bearer_auth("clock-admin");
        if let Some(body) = body {
            request = request.json(&body);
        }
        let reply = request.send().await.unwrap();
        (
            reply.status().as_u16(),
            reply.json::<serde_json::Value>().await.unwrap(),
        )
    };
    use reqwest::Method;
    use serde_json::json;
    let posted = json!({"account": "c1", "resource": "api_requests", "amount": "1", "idempotency_key": "post"});
    let (status, body) = send(Method::POST, "/v1/entries", Some(posted)).await;
    assert!(status < 300, "{status} {body}");
    // Undated, and dated a minute back: PostgreSQL decides them in its two
    // group functions.
    for consume in [
        json!({"account": "c1", "resource": "api_requests", "amount": "1", "idempotency_key": "now"}),
        json!({"account": "c1", "resource": "api_requests", "amount": "1", "idempotency_key": "dated",
               "occurred_at": "2036-03-10T11:59:00Z"}),
    ] {
        let (status, body) = send(Method::POST, "/v1/quota/consume", Some(consume)).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = send(Method::PUT, "/v1/accounts/c1/plan", Some(json!({"plan": "pro"}))).await;
    assert_eq!(status, 200, "{body}");

    let on_the_servers_day = |stamp: &serde_json::Value| stamp.as_str().is_some_and(|s| s.starts_with("2036-03-10T"));
    let (status, listing) = send(Method::GET, "/v1/accounts/c1/entries", None).await;
    assert_eq!(status, 200, "{listing}");
    let entries = listing["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3, "{listing}");
    for entry in entries {
        assert!(on_the_servers_day(&entry["recorded_at"]), "{entry}");
    }
    let (status, account) = send(Method::GET, "/v1/accounts/c1", None).await;
    assert_eq!(status, 200, "{account}");
    let assignment = &account["plan_history"][0];
    assert!(on_the_servers_day(&assignment["created_at"]), "{account}");
    let (status, health) = send(Method::GET, "/healthz", None).await;
    assert_eq!(status, 200, "{health}");
    let lag = health["rollup_lag_seconds"].as_i64().unwrap();
    assert!((0..600).contains(&lag), "{health}");
    assert!(serve.stop().await.success(), "{}", serve.stderr());
}
