//! The HTTP API (axum). Each module has a `router()`; [`router`] merges them.

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod connection;
pub mod entries;
pub mod error;
pub mod extract;
pub mod open_connections;
pub mod operations;
pub mod params;
pub mod quota;
pub mod stop_accepting;
pub mod timeseries;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::{Router, middleware};
use chrono::Duration;
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

use crate::clock::Clock;
use crate::domain::{Catalog, KeySecret};
use crate::store::Store;
use crate::telemetry::Metrics;
use crate::usage::rate_limit::RateLimits;
use error::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub store: Arc<dyn Store>,
    /// Resources and plans.
    pub catalog: Arc<Catalog>,
    /// Hash of `TALLY_ADMIN_KEY`, when set.
    pub admin_key_hash: Option<String>,
    /// Entries older than this are `too_late`.
    pub late_horizon: Duration,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Per-minute rate limiters (in process).
    pub rates: Arc<RateLimits>,
    /// Keys recently authenticated (see [`auth::KEY_CACHE_TTL`]).
    pub keys: Arc<auth::KeyCache>,
    /// "Now" for the handlers (tests freeze it).
    pub clock: Clock,
    /// How long a request's body may take to arrive, plus a second per
    /// 16 KiB received (`--read-timeout`; the head and the answers are held
    /// to it by [`Server::run`]).
    pub read_timeout: std::time::Duration,
}

impl AppState {
    /// State over a store, with the settings that matter to handlers.
    pub fn new(store: Arc<dyn Store>, catalog: Arc<Catalog>, admin_key: Option<&str>, late_horizon: Duration) -> Self {
        Self {
            store,
            catalog,
            admin_key_hash: admin_key.map(|k| KeySecret::from_presented(k).hash()),
            late_horizon,
            metrics: Arc::new(Metrics::default()),
            rates: Arc::new(RateLimits::default()),
            keys: Arc::new(auth::KeyCache::default()),
            clock: Clock::default(),
            read_timeout: std::time::Duration::from_secs(crate::app::DEFAULT_READ_TIMEOUT_SECONDS),
        }
    }
}

/// All routes, with request tracing. (Bodies are limited where they are
/// read, by `extract::Body`, which every route that takes one uses.)
pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .merge(entries::router())
        .merge(timeseries::router())
        .merge(quota::router())
        .merge(accounts::router())
        .merge(admin::router())
        .merge(operations::router())
        .fallback(not_found)
        // After the merges: it applies to the routes present when called.
        .method_not_allowed_fallback(method_not_allowed);
    with_layers(routes, state)
}

/// `routes` with what every request passes through, innermost first: a
/// handler's panic made a 500, the request counter, the request's span.
fn with_layers(routes: Router<AppState>, state: AppState) -> Router {
    routes
        // Inside the counter and the span: a panic's 500 is counted in
        // `tally_http_requests_total` and logged with its request, as any
        // other 500 (it was answered outside both, by the task's end).
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(answer_a_panic))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            operations::count_requests,
        ))
        .layer(
            TraceLayer::new_for_http()
                // At info, under this crate's name, so the default filter
                // keeps it: a 5xx logged inside names its request (the
                // account is in the path).
                .make_span_with(|request: &axum::http::Request<_>| {
                    tracing::info_span!("request", method = %request.method(), path = %request.uri().path())
                })
                // ApiError logs each 5xx with its cause; tower_http's line
                // would only repeat the status.
                .on_failure(()),
        )
        .with_state(state)
}

/// A handler's panic as the contract's 500, its message logged as the cause.
fn answer_a_panic(panic: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|m| (*m).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".to_owned());
    axum::response::IntoResponse::into_response(ApiError::Internal(
        format!("the request's handler panicked: {message}").into(),
    ))
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    // The path only: a query may carry what the caller did not mean to have
    // repeated back (or logged).
    ApiError::NotFound(format!(
        "no route for {}; the endpoints are listed in docs/api.md (all under /v1/, plus /healthz and /metrics)",
        uri.path()
    ))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{method} is not allowed on {}; the Allow header lists the methods it takes",
        uri.path()
    ))
}

/// A bound server, ready to run. Tests build it on port 0 and read the port.
pub struct Server {
    listener: TcpListener,
    /// The routes, as hyper's service.
    service: RunToCompletion,
    /// How long requests in flight may finish after a stop request.
    grace: std::time::Duration,
    /// How long a request's head may take to arrive, an idle kept-alive
    /// connection may wait for the next one, and an answer may wait for the
    /// client to read it.
    read_timeout: std::time::Duration,
    /// How many connections may be open at once ([`connection::connection_cap`]).
    max_connections: usize,
    /// For the open-connections gauge.
    metrics: Arc<Metrics>,
}

/// How often, at most, `serve` warns that it holds as many connections as
/// `--max-connections` allows: once per stretch of load, not once per client.
const FULL_WARNING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

impl Server {
    /// Binds `listen` (port 0 picks a free port), to serve at most
    /// `max_connections` at once (fewer when the open-file limit cannot
    /// hold them: [`connection::connection_cap`]).
    pub async fn bind(
        listen: SocketAddr,
        grace: std::time::Duration,
        max_connections: usize,
        state: AppState,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let max_connections = connection::connection_cap(max_connections);
        Ok(Self {
            listener,
            read_timeout: state.read_timeout,
            max_connections,
            metrics: state.metrics.clone(),
            service: RunToCompletion {
                router: router(state),
                closes_owed: Arc::default(),
                stopping: Arc::default(),
                running: Arc::new(tokio::sync::Semaphore::new(places_for(max_connections) as usize)),
            },
            grace,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Begins the stop: from now on every answer closes its connection, and
    /// new clients are kept out of the listener's queue, so that the ones in
    /// it can be taken to the last ([`stop_accepting`]). Returns when the
    /// stop was asked for; the grace counts from it.
    fn stop(&self, service: &RunToCompletion) -> tokio::time::Instant {
        let asked = tokio::time::Instant::now();
        service.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
        if stop_accepting::refuse_new_clients(&self.listener) {
            tracing::debug!("stopping: new clients are kept out; the queued ones are taken and answered");
        }
        asked
    }

    /// Serves until `shutdown` resolves, then finishes requests in flight,
    /// those whose clients have gone too, for at most the grace period: a
    /// client that never sends the rest of its body must not keep the
    /// process from stopping. Each connection closes after its next answer
    /// or once quiet for a second ([`open_connections`]), whichever comes
    /// first. The clients already waiting at the signal (held at the cap, or
    /// queued by the kernel) are taken and answered too, within the grace;
    /// later ones are refused ([`stop_accepting`]).
    ///
    /// Served through hyper rather than `axum::serve`, which gives hyper no
    /// timer: without one a connection that sends its head a byte at a time,
    /// or sends nothing after its first request, is kept for ever, and a few
    /// hundred of them take every file descriptor (review AW). A client that
    /// takes no answer is ended by [`connection::WriteDeadline`] (review AY).
    ///
    /// At `max_connections` open, the loop holds the next client it takes
    /// until a connection closes, and the clients after it wait in the
    /// kernel's listen queue, rather than take file descriptors the database
    /// needs. For that client one connection closes: the next to answer, or
    /// one quiet for a second (kept alive and idle, or silent since it was
    /// accepted: [`open_connections`]), whichever comes first.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.read_timeout);
        let service = self.service.clone();
        let connections = Arc::new(open_connections::OpenConnections::default());
        let mut shutdown = std::pin::pin!(shutdown);
        let slots = Arc::new(tokio::sync::Semaphore::new(self.max_connections));
        let mut warned_full_at: Option<std::time::Instant> = None;
        // When the stop was asked for; the grace counts from it.
        let mut stop_asked: Option<tokio::time::Instant> = None;
        'serving: loop {
            let (stream, peer) = match stop_asked {
                None => tokio::select! {
                    accepted = self.listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            wait_after_accept_error(&error).await;
                            continue;
                        }
                    },
                    () = &mut shutdown => {
                        stop_asked = Some(self.stop(&service));
                        continue;
                    }
                },
                // Stopping: the clients the kernel had queued at the signal,
                // which may have sent a request, are taken and answered (with
                // `Connection: close`) rather than reset with the listener
                // (review BT); it closes once none is waiting and the
                // handshakes under way at the signal have had a quarter
                // second (no new one can join: `stop`), or the grace is over.
                Some(asked) => {
                    if asked.elapsed() >= self.grace {
                        break;
                    }
                    let taken = match stop_accepting::take_waiting(&self.listener) {
                        // None queued now: a handshake under way at the
                        // signal completes a round trip later (review BX).
                        // tokio's accept serves here: it waits for the
                        // next readiness event, which such a client raises.
                        Ok(None) => {
                            let until = asked + stop_accepting::HANDSHAKES_UNDER_WAY.min(self.grace);
                            match tokio::time::timeout_at(until, self.listener.accept()).await {
                                Ok(accepted) => accepted.map(Some),
                                Err(_) => Ok(None),
                            }
                        }
                        taken => taken,
                    };
                    match taken {
                        Ok(Some(accepted)) => accepted,
                        Ok(None) => break,
                        Err(error) if is_one_connections_error(&error) => continue,
                        Err(error) => {
                            tracing::debug!(error = %error, "stopping: cannot take the next queued client: {error}");
                            break;
                        }
                    }
                }
            };
            // At the cap, the client just taken (one past it) waits for a
            // slot, and one connection is closed for it: a quiet one (kept
            // alive and idle, or silent since it was accepted), which would
            // otherwise hold its slot until the read timeout, or else the
            // next to answer (`Connection: close`),
            // since busy kept-alive clients would otherwise hold every slot
            // for as long as they keep sending, and the ones waiting,
            // `/healthz` among them, would never get in (review BO). One
            // connection, not every answer until the slot is taken: that
            // would close many for one waiting client (review BP).
            let slot = match slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    if warned_full_at.is_none_or(|at| at.elapsed() >= FULL_WARNING_INTERVAL) {
                        warned_full_at = Some(std::time::Instant::now());
                        tracing::warn!(
                            max_connections = self.max_connections,
                            "at the cap of {} open connections (--max-connections, or what the open-file limit \
                             left of it at start): new ones wait until one closes, and one is closed for each, one quiet \
                             for a second or else the next to answer (warned at most once a minute)",
                            self.max_connections
                        );
                    }
                    if stop_asked.is_none() && !connections.close_one_quiet() {
                        service.closes_owed.store(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    let slot = loop {
                        let grace_over = stop_asked.unwrap_or_else(tokio::time::Instant::now) + self.grace;
                        tokio::select! {
                            slot = slots.clone().acquire_owned() => break slot.expect("the semaphore is never closed"),
                            // A stop while a client waits: it waits on, for
                            // a slot the stop frees (every answer closes its
                            // connection, quiet ones are closed), within the
                            // grace; it was reset before (review BT).
                            () = &mut shutdown, if stop_asked.is_none() => stop_asked = Some(self.stop(&service)),
                            () = tokio::time::sleep_until(grace_over), if stop_asked.is_some() => break 'serving,
                            // Still no slot a quarter second on. Connections
                            // quiet for less than a second when the client
                            // came may have no next answer to close them (a
                            // pool's idle ones): look again as they age
                            // (review BS: a probe waited the read timeout).
                            // And a quiet connection told to close may not
                            // have: one with half of its first head sent is
                            // kept by hyper for the rest (review BT: the
                            // probe waited the read timeout, 18.5 s, beside
                            // an idle one): tell the next. A told idle
                            // connection, or one whose answer took the close
                            // owed, frees its slot well within the quarter
                            // second, so a second one is closed only when the
                            // first is slow to go (half a head, a long answer
                            // to a slow reader).
                            () = tokio::time::sleep(open_connections::IDLE_BEFORE_CLOSING / 4) => {
                                if stop_asked.is_some() {
                                    connections.close_quiet();
                                } else if connections.close_one_quiet() {
                                    service.closes_owed.store(0, std::sync::atomic::Ordering::Relaxed);
                                }
                            }
                        }
                    };
                    service.closes_owed.store(0, std::sync::atomic::Ordering::Relaxed);
                    slot
                }
            };
            // Answers are small and sent whole: do not hold their last
            // segment back for the client's acknowledgement.
            let _ = stream.set_nodelay(true);
            connection::wake_writes_often(&stream);
            let (number, this_connection) = connections.opened();
            let io = connection::WriteDeadline::new(
                open_connections::Activity::new(hyper_util::rt::TokioIo::new(stream), this_connection.clone()),
                self.read_timeout,
            );
            let connection = http.serve_connection(
                io,
                OnConnection {
                    requests: service.clone(),
                    connection: this_connection.clone(),
                },
            );
            let open = self.metrics.http_connections_open.clone();
            open.inc();
            let connections = connections.clone();
            tokio::spawn(async move {
                let mut connection = std::pin::pin!(connection);
                let ended = tokio::select! {
                    ended = connection.as_mut() => ended,
                    () = this_connection.told_to_close() => {
                        // Closes now if idle, else after the request in flight.
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                connections.closed(number);
                if let Err(error) = ended {
                    // A head not sent within the read timeout, a client gone
                    // mid-request, one that took no answer: the
                    // connection's end, not the server's. The peer says
                    // which client, for an operator following one up.
                    // hyper's own words ("error writing a body") hide the
                    // cause: give the chain.
                    let error = crate::telemetry::cause_chain(&error);
                    tracing::debug!(peer = %peer, error = %error, "connection from {peer} ended: {error}");
                }
                open.dec();
                drop(slot);
            });
        }
        drop(self.listener);
        let grace = self.grace;
        let stop_asked = stop_asked.unwrap_or_else(tokio::time::Instant::now);
        // Since the stop every answer closes its connection; connections
        // quiet for a second are closed, looked for again as they age.
        // Closing every one at once dropped the request a client sending
        // back to back had just sent (review BS).
        let finished = async {
            // Every connection has closed once every slot is back.
            let every_slot = slots.acquire_many(u32::try_from(self.max_connections).unwrap_or(u32::MAX));
            let mut every_slot = std::pin::pin!(every_slot);
            loop {
                connections.close_quiet();
                tokio::select! {
                    _every_slot = every_slot.as_mut() => break,
                    () = tokio::time::sleep(open_connections::IDLE_BEFORE_CLOSING / 4) => {}
                }
            }
            // Requests whose clients have gone run on in tasks of their own
            // (`RunToCompletion`): wait for them too, or the process would
            // end them mid-transaction once the pools' close gave up (5 s),
            // and a write a client may retry would be lost.
            let _every_place = service.running.acquire_many(places_for(self.max_connections)).await;
        };
        if tokio::time::timeout_at(stop_asked + grace, finished).await.is_err() {
            tracing::warn!(
                grace_seconds = grace.as_secs(),
                "requests still in flight {} s after the stop request; stopping without them",
                grace.as_secs()
            );
        }
        Ok(())
    }
}

/// The router as hyper's service, each request handled in a task of its own
/// that runs to its end whatever becomes of the connection.
///
/// hyper drops a request's future when its client goes away, and sqlx is
/// not safe to drop mid-transaction: a write cancelled inside `BEGIN` or
/// while waiting for its lock left its transaction open on the pooled
/// connection (review BO). On SQLite the writer then held the write lock
/// and answered every later write 500 ("attempted to call begin_with at
/// non-zero transaction depth") until a restart; on PostgreSQL the next
/// request on that connection ran inside the leaked transaction, which was
/// rolled back later, and a plan change answered 200 was lost. Run in its
/// own task, a request whose client has gone finishes, commits or rolls
/// back, and only its answer is dropped (a retry with the same key gets
/// the recorded outcome).
///
/// While a client waits for a connection slot, the next answer (one per
/// waiting client: `closes_owed`) carries `Connection: close`, so that
/// hyper ends its connection and frees a slot ([`Server::run`]); from a
/// stop on (`stopping`), every answer does.
///
/// A request whose client has gone keeps running, outside the connection
/// cap: `running` bounds all of them, so that clients that time out and
/// retry cannot pile up work, and bodies of up to 10 MiB, without end
/// (review BP). A request waits for a place before it starts, when nothing
/// of it has run yet.
#[derive(Clone)]
struct RunToCompletion {
    router: Router,
    closes_owed: Arc<std::sync::atomic::AtomicUsize>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    running: Arc<tokio::sync::Semaphore>,
}

/// An answer on its way, as hyper's services here give it.
type Answer = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send>,
>;

/// [`RunToCompletion`] on one connection, which it tells whether a request
/// is in flight ([`open_connections::OpenConnection::handling`]).
#[derive(Clone)]
struct OnConnection {
    requests: RunToCompletion,
    connection: Arc<open_connections::OpenConnection>,
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for OnConnection {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = Answer;

    fn call(&self, request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let handling = self.connection.handling();
        let answer = self.requests.call(request);
        Box::pin(async move {
            let answer = answer.await;
            // The answer is handed to hyper whole; while it is written, the
            // connection's I/O keeps it from looking idle
            // (`open_connections::Activity`).
            drop(handling);
            answer
        })
    }
}

/// Requests that may run at once per connection slot: one on each open
/// connection, and as many again whose clients have gone.
const REQUESTS_PER_CONNECTION_SLOT: usize = 2;

/// The places for requests in flight under `max_connections`
/// ([`RunToCompletion`]), as a count a stop can wait for all of at once.
fn places_for(max_connections: usize) -> u32 {
    u32::try_from(max_connections.saturating_mul(REQUESTS_PER_CONNECTION_SLOT)).unwrap_or(u32::MAX)
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for RunToCompletion {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = Answer;

    fn call(&self, request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        use tower::ServiceExt as _;
        let router = self.router.clone();
        let closes_owed = self.closes_owed.clone();
        let stopping = self.stopping.clone();
        let running = self.running.clone();
        Box::pin(async move {
            let place = running.acquire_owned().await.expect("the semaphore is never closed");
            // The request's span (`request{method path}`) is made inside the
            // router, by its TraceLayer: the task carries it.
            let handled = tokio::spawn(async move {
                let answered = router.oneshot(request).await;
                drop(place);
                answered
            });
            let mut response = match handled.await {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                // A handler's panic is answered inside the router
                // (`answer_a_panic`); this is for one outside it, in a layer.
                Err(failed) => axum::response::IntoResponse::into_response(ApiError::Internal(failed.into())),
            };
            if stopping.load(std::sync::atomic::Ordering::Relaxed) || take_one_owed(&closes_owed) {
                response.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
            }
            Ok(response)
        })
    }
}

/// Whether this answer closes its connection: yes while one is owed to a
/// waiting client, and then no more ([`RunToCompletion`]).
fn take_one_owed(closes_owed: &std::sync::atomic::AtomicUsize) -> bool {
    closes_owed
        .fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |owed| owed.checked_sub(1),
        )
        .is_ok()
}

/// After a failed accept: at once for an error of that one connection (it
/// was reset before it was taken); otherwise (out of file descriptors, say)
/// the error is logged and the loop pauses a second, as `axum::serve` does,
/// rather than spin.
async fn wait_after_accept_error(error: &std::io::Error) {
    if is_one_connections_error(error) {
        return;
    }
    tracing::error!(error = %error, "cannot accept a connection: {error}; trying again in 1 s");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}

/// Whether a failed accept failed for that one connection (reset before it
/// was taken), not for the listener.
fn is_one_connections_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tower::ServiceExt as _;

    use crate::telemetry::HttpLabels;

    /// A handler's panic answers the contract's 500 from inside the router,
    /// so the request counter counts it (it was answered past the counter,
    /// when the request's task ended, and not counted).
    #[tokio::test]
    async fn a_handler_that_panics_answers_500_and_is_counted() {
        let catalog = Arc::new(crate::domain::Catalog::builtin());
        let store = crate::store::connect("sqlite::memory:", catalog.clone()).await.unwrap();
        let state = super::AppState::new(store, catalog, None, chrono::Duration::days(35));
        let routes = axum::Router::new().route(
            "/boom",
            axum::routing::get(|| async {
                if true {
                    panic!("boom");
                }
            }),
        );
        let answer = super::with_layers(routes, state.clone())
            .oneshot(
                axum::http::Request::get("/boom")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(answer.status(), 500);
        let body = axum::body::to_bytes(answer.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "internal", "{body}");
        let counted = state
            .metrics
            .http_requests
            .get_or_create(&HttpLabels {
                route: "/boom".into(),
                method: "GET".into(),
                status: 500,
            })
            .get();
        assert_eq!(counted, 1);
    }

    #[test]
    fn one_waiting_client_closes_one_connection() {
        let owed = std::sync::atomic::AtomicUsize::new(0);
        assert!(!super::take_one_owed(&owed), "no one waits");
        owed.store(1, std::sync::atomic::Ordering::Relaxed);
        assert!(super::take_one_owed(&owed));
        assert!(!super::take_one_owed(&owed), "the close owed was given");
    }
}
