//! Group commit for consume: the consumes waiting at one instant are decided
//! by one call of `tally_consume_group` (or `_dated`, when a consume of the
//! group is dated by its caller; both as migration 0020 last defines them,
//! first written in 0006 and 0016): one round trip, one
//! transaction, one commit, and one `used` read per (account, resource, period)
//! instead of one per consume.
//!
//! A worker that is free takes what is queued, after letting the tasks that
//! are ready run once; a lone consume goes at once, as a group of one. Groups
//! grow while every worker is busy, that is, exactly when one call per
//! consume would be the bottleneck. A worker takes at most its share of the
//! callers, and while another group is being decided it waits (at most
//! [`MAX_WAIT`]) for the callers on their way back to fill it, so the workers
//! decide groups of even size side by side (see [`gather_share`]). A worker
//! holds one pool connection while its group runs; [`WORKERS`] bounds them.
//!
//! A group never holds two consumes with the same (account, idempotency key):
//! the later one waits for the next group. If a group's call fails, each of
//! its consumes is retried alone, so every caller gets its own answer (or its
//! own error).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Map, Value, json};
use sqlx::{FromRow, PgPool};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};

use super::super::settled::{Bounds, Epoch, Settled};
use super::super::{ConsumeRules, StoreError};
use crate::domain::NewEntry;

/// Groups in flight at once (each on its own pool connection). Measured with
/// `tally-bench quota --part consume` on 2 cores: 1, 2 and 4 workers within
/// noise of each other with fsync off; with fsync on, 2 beat 4 (10 553/s vs
/// 7 603/s spread): more workers split the queue into smaller groups, and
/// consumes of one hot (account, resource) wait on each other's lock anyway.
/// 3 against 2 (fsync on, 2026-12-02): spread within noise, hot worse
/// (docs/performance.md, "Fifth session"). With shares ([`gather_share`]),
/// 3 and 4 workers were worse than 2 on both (fsync on, "Sixth session").
/// One worker against two after migration 0008 (fsync on, 2026-12-07):
/// no gain at 16 callers, 9–20 % less spread at 64 ("Thirty-seventh session").
const WORKERS: usize = 2;

/// How many times a worker lets other tasks run before it takes its group.
const MAX_YIELDS: usize = 8;

/// The longest a worker waits for callers on their way back to fill its
/// share while another group is being decided (see [`gather_share`]).
const MAX_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

/// The most consumes decided in one call.
const MAX_GROUP: usize = 512;

/// One consume to decide.
pub(super) struct Request {
    /// The entry to record.
    pub entry: NewEntry,
    /// The catalog's rules for its resource.
    pub rules: ConsumeRules,
    /// The period of `known`.
    pub likely: Bounds,
    /// The settled sum for `likely`, if cached.
    pub known: Option<Settled>,
    /// The epoch `known` was looked up in.
    pub epoch: Epoch,
    /// For a consume dated by its caller, the instant it is answered: it is
    /// held to the limit in force then too (since migration 0016).
    pub now: Option<chrono::DateTime<chrono::Utc>>,
}

/// What `tally_consume_group` answers for one consume.
#[derive(Debug, FromRow)]
pub(super) struct Decided {
    /// 1-based position in the call's arrays.
    pub idx: i32,
    /// `recorded`, `rejected` (past the limit at its instant),
    /// `rejected_now` (past the limit in force now), `replayed`, `conflict`,
    /// or `undecided` (held to two windows: the multi-statement path's).
    /// Only `recorded` wrote anything.
    pub outcome: String,
    /// The new entry (recorded) or the stored one (replayed).
    pub entry_id: Option<i64>,
    /// Units used before this consume.
    pub used: Option<i64>,
    /// The resolved limit as JSON (with `used_after` when recorded).
    pub context: Option<String>,
    /// The period `used` counts in.
    pub period_start: Option<chrono::NaiveDate>,
    /// Its end (exclusive).
    pub period_end: Option<chrono::NaiveDate>,
    /// The settled-sum watermark after the read.
    pub mark: Option<i64>,
    /// The settled sum below it.
    pub settled: Option<i64>,
}

struct Waiting {
    request: Request,
    answer: oneshot::Sender<Result<Decided, StoreError>>,
}

/// The queue of consumes and the workers that decide them in groups.
pub(super) struct ConsumeGroups {
    queue: mpsc::UnboundedSender<Waiting>,
    shared: Arc<Shared>,
}

/// What the workers share.
struct Shared {
    /// The consumes not yet in a group; the worker holding it is the one
    /// gathering the next group.
    receiver: Mutex<mpsc::UnboundedReceiver<Waiting>>,
    /// Wakes the gathering worker: a consume arrived or a group was answered.
    changed: Notify,
    /// Consumes inside a group call now.
    deciding: AtomicUsize,
    /// Consumes answered whose callers have not sent another one since: who
    /// is likely to come back soon. An estimate: a caller that stops never
    /// comes back, so a wait that times out forgets them all.
    returning: AtomicUsize,
}

impl ConsumeGroups {
    /// Starts [`WORKERS`] workers on the current runtime; they stop when this
    /// is dropped and the queue is empty.
    pub(super) fn start(pool: &PgPool) -> Self {
        let (queue, receiver) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            receiver: Mutex::new(receiver),
            changed: Notify::new(),
            deciding: AtomicUsize::new(0),
            returning: AtomicUsize::new(0),
        });
        for _ in 0..WORKERS {
            tokio::spawn(work(pool.clone(), shared.clone()));
        }
        Self { queue, shared }
    }

    /// Decides `request` in the next group a worker takes.
    pub(super) async fn decide(&self, request: Request) -> Result<Decided, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Waiting { request, answer })
            .map_err(|_| StoreError::Unavailable(sqlx::Error::WorkerCrashed))?;
        // Any caller counts as one that came back: at worst the gathering
        // worker waits for one caller fewer than it could have.
        let _ = self
            .shared
            .returning
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.shared.changed.notify_one();
        answered
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::WorkerCrashed))?
    }
}

/// A worker: gathers its share of the queue (up to [`MAX_GROUP`]), decides it
/// in one call, answers each caller, and again.
async fn work(pool: PgPool, shared: Arc<Shared>) {
    let mut deferred: Vec<Waiting> = Vec::new();
    loop {
        let mut taken = std::mem::take(&mut deferred);
        if taken.is_empty() {
            let mut receiver = shared.receiver.lock().await;
            match receiver.recv().await {
                Some(first) => taken.push(first),
                None => return,
            }
            // Callers just answered by the other worker are about to send
            // their next consume: let them run first (a few microseconds),
            // while the queue keeps growing, so they share this group
            // instead of each paying a call of its own.
            for _ in 0..MAX_YIELDS {
                let before = receiver.len();
                tokio::task::yield_now().await;
                if receiver.len() == before {
                    break;
                }
            }
            gather_share(&shared, &mut receiver, &mut taken).await;
        } else if let Ok(mut receiver) = shared.receiver.try_lock() {
            // With work in hand, never wait for the queue: the worker holding
            // it may be waiting for a consume that will not come.
            drain(&mut receiver, &mut taken, MAX_GROUP);
        }
        let (group, later) = split_group(taken);
        deferred = later;
        decide_group(&pool, &shared, group).await;
    }
}

/// Fills `taken` up to this worker's share of the callers (all of them, over
/// [`WORKERS`]), never past it; while another group is being decided and
/// callers just answered are on their way back, waits for them (at most
/// [`MAX_WAIT`]).
///
/// Why: without a share, the worker that has just answered a group takes
/// the first caller back as a group of one while the other worker takes the
/// rest, and keeps doing so: measured on 2 cores, half the calls decided a
/// single consume, each paying a whole call. Waiting costs little while the
/// database is busy with the other group, and never happens when it is idle
/// (a lone consume goes at once).
async fn gather_share(shared: &Shared, receiver: &mut mpsc::UnboundedReceiver<Waiting>, taken: &mut Vec<Waiting>) {
    let deadline = tokio::time::Instant::now() + MAX_WAIT;
    loop {
        let deciding = shared.deciding.load(Ordering::Acquire);
        let returning = shared.returning.load(Ordering::Acquire);
        let callers = taken.len() + receiver.len() + returning + deciding;
        let share = callers.div_ceil(WORKERS).clamp(1, MAX_GROUP);
        drain(receiver, taken, share);
        // With nobody on the way back, the rest of the share is in the other
        // group: waiting for it would mean waiting for that group to end
        // (measured: 17 % fewer consumes with 3 callers). Uneven groups even
        // out through the share's cap instead.
        if deciding == 0 || taken.len() >= share || returning == 0 {
            return;
        }
        // `notify_one` leaves a permit when nobody waits, so a change since
        // the loads above is not missed.
        if tokio::time::timeout_at(deadline, shared.changed.notified())
            .await
            .is_err()
        {
            tracing::trace!(
                taken = taken.len(),
                share,
                "gave up waiting for {share} consumes, taking {}",
                taken.len()
            );
            shared.returning.store(0, Ordering::Release);
            drain(receiver, taken, share);
            return;
        }
    }
}

/// Moves what is queued now into `taken`, up to `most` in all.
fn drain(receiver: &mut mpsc::UnboundedReceiver<Waiting>, taken: &mut Vec<Waiting>, most: usize) {
    while taken.len() < most {
        match receiver.try_recv() {
            Ok(next) => taken.push(next),
            Err(_) => break,
        }
    }
}

/// The consumes that can share one call, in arrival order, and the rest: a
/// second consume under an (account, key) already in the group (it waits for
/// the next group, where it is replayed against the first), or one whose
/// catalog rules differ from the group's (a catalog reloaded between the two).
fn split_group(taken: Vec<Waiting>) -> (Vec<Waiting>, Vec<Waiting>) {
    let mut keys = HashSet::with_capacity(taken.len());
    let mut rules: Vec<(&str, &ConsumeRules)> = Vec::new();
    let mut fits = Vec::with_capacity(taken.len());
    for waiting in &taken {
        let (entry, own) = (&waiting.request.entry, &waiting.request.rules);
        let unique = keys.insert((entry.account.as_str(), entry.idempotency_key.as_str()));
        let same_default = rules
            .first()
            .is_none_or(|(_, first)| first.default_plan == own.default_plan);
        let same_rules = match rules.iter().find(|(resource, _)| *resource == entry.resource.as_str()) {
            Some((_, known)) => known.plans == own.plans,
            None => {
                rules.push((entry.resource.as_str(), own));
                true
            }
        };
        fits.push(unique && same_default && same_rules);
    }
    let mut group = Vec::with_capacity(taken.len());
    let mut later = Vec::new();
    for (waiting, fits) in taken.into_iter().zip(fits) {
        if fits {
            group.push(waiting);
        } else {
            later.push(waiting);
        }
    }
    (group, later)
}

/// Decides `group` and answers each caller; keeps the counts
/// [`gather_share`] reads.
async fn decide_group(pool: &PgPool, shared: &Shared, group: Vec<Waiting>) {
    shared.deciding.fetch_add(group.len(), Ordering::AcqRel);
    decide(pool, group, &mut |caller, decided| {
        // Counted before the answer goes out, so that the caller's next
        // consume cannot arrive before it is expected.
        shared.returning.fetch_add(1, Ordering::AcqRel);
        shared.deciding.fetch_sub(1, Ordering::AcqRel);
        // A caller that stopped waiting needs no answer.
        let _ = caller.send(decided);
    })
    .await;
    shared.changed.notify_one();
}

/// Where a caller's answer goes.
type Caller = oneshot::Sender<Result<Decided, StoreError>>;

/// Decides `group` in one call; if the call fails, each consume alone, each
/// answered as soon as its own call returns (but if the database is
/// unavailable, every consume of the group gets that answer at once).
async fn decide(
    pool: &PgPool,
    group: Vec<Waiting>,
    answer: &mut (dyn FnMut(Caller, Result<Decided, StoreError>) + Send),
) {
    let requests: Vec<&Request> = group.iter().map(|w| &w.request).collect();
    let started = std::time::Instant::now();
    match call(pool, &requests).await {
        Ok(rows) => {
            let micros = started.elapsed().as_micros();
            tracing::trace!(
                consumes = group.len(),
                micros,
                "decided a group of {} consumes in {micros} µs",
                group.len()
            );
            for (waiting, decided) in by_position(group, rows) {
                answer(waiting.answer, decided);
            }
        }
        Err(StoreError::Unavailable(cause)) => {
            // The database is out of reach: deciding each consume alone would
            // make the k-th caller wait k more timeouts for the same answer.
            let shared = cause.to_string();
            tracing::warn!(
                consumes = group.len(),
                error = %shared,
                "a group of {} consumes found the database unavailable: {shared}",
                group.len()
            );
            // sqlx's errors do not clone: the first caller gets the error
            // itself, the others its kind (pool) or its words (I/O).
            let pool_timed_out = matches!(cause, sqlx::Error::PoolTimedOut);
            let mut first = Some(cause);
            for waiting in group {
                let cause = first.take().unwrap_or_else(|| {
                    if pool_timed_out {
                        sqlx::Error::PoolTimedOut
                    } else {
                        sqlx::Error::Io(std::io::Error::other(shared.clone()))
                    }
                });
                answer(waiting.answer, Err(StoreError::Unavailable(cause)));
            }
        }
        Err(error) if group.len() > 1 => {
            let alone = if is_for_one_at_a_time(&error) {
                // Only a key with several consumes in the group can count
                // over two windows: those go one at a time, the others
                // together again (they cannot raise this again).
                let (alone, together) = split_shared_keys(group);
                tracing::debug!(
                    consumes = alone.len() + together.len(),
                    alone = alone.len(),
                    "a group of {} consumes counts one key over two windows, deciding the {} of keys with \
                     several consumes alone",
                    alone.len() + together.len(),
                    alone.len()
                );
                if together.len() > 1 {
                    Box::pin(decide(pool, together, answer)).await;
                    alone
                } else {
                    alone.into_iter().chain(together).collect()
                }
            } else {
                let cause = crate::telemetry::cause_chain(&error);
                if matches!(&error, StoreError::Internal(e) if super::is_idempotency_violation(e)) {
                    // A key taken meanwhile by a concurrent request: expected
                    // under load, and each consume alone answers it.
                    tracing::debug!(
                        consumes = group.len(),
                        error = %cause,
                        "a group of {} consumes met a key taken meanwhile, deciding each alone: {cause}",
                        group.len()
                    );
                } else {
                    tracing::warn!(
                        consumes = group.len(),
                        error = %cause,
                        "a group of {} consumes failed, deciding each alone: {cause}",
                        group.len()
                    );
                }
                group
            };
            for waiting in alone {
                let alone = call(pool, &[&waiting.request]).await;
                let decided = alone.and_then(|rows| {
                    rows.into_iter()
                        .next()
                        .ok_or_else(|| StoreError::Unexpected("tally_consume_group answered no row".into()))
                });
                answer(waiting.answer, decided);
            }
        }
        Err(error) => {
            if let Some(waiting) = group.into_iter().next() {
                answer(waiting.answer, Err(error));
            }
        }
    }
}

/// `group` split into the consumes of (account, resource) keys it holds
/// more than once, and the others.
fn split_shared_keys(group: Vec<Waiting>) -> (Vec<Waiting>, Vec<Waiting>) {
    let key = |w: &Waiting| (w.request.entry.account.clone(), w.request.entry.resource.clone());
    let mut seen = HashSet::new();
    let shared: HashSet<_> = group.iter().map(key).filter(|k| !seen.insert(k.clone())).collect();
    group.into_iter().partition(|w| shared.contains(&key(w)))
}

/// Whether `tally_consume_group` refused the group as one to decide one
/// consume at a time (SQLSTATE TL001, raised since migration 0007; the body
/// in force is 0020's): expected, not a fault.
fn is_for_one_at_a_time(error: &StoreError) -> bool {
    matches!(error, StoreError::Internal(sqlx::Error::Database(db)) if db.code().as_deref() == Some("TL001"))
}

/// Each consume of `group` beside its row (by `idx`).
fn by_position(group: Vec<Waiting>, rows: Vec<Decided>) -> Vec<(Waiting, Result<Decided, StoreError>)> {
    let mut slots: Vec<Option<Decided>> = (0..group.len()).map(|_| None).collect();
    for row in rows {
        let slot = usize::try_from(row.idx - 1).ok().and_then(|i| slots.get_mut(i));
        if let Some(slot) = slot {
            *slot = Some(row);
        }
    }
    group
        .into_iter()
        .zip(slots)
        .map(|(waiting, row)| {
            let decided =
                row.ok_or_else(|| StoreError::Unexpected("tally_consume_group left a consume unanswered".into()));
            (waiting, decided)
        })
        .collect()
}

/// One call of `tally_consume_group` (`tally_consume_group_dated` when a
/// consume of the group is dated) in autocommit (one transaction).
async fn call(pool: &PgPool, requests: &[&Request]) -> Result<Vec<Decided>, StoreError> {
    let n = requests.len();
    let mut accounts = Vec::with_capacity(n);
    let mut resources = Vec::with_capacity(n);
    let mut amounts = Vec::with_capacity(n);
    let mut occurred_at = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut sources = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    let mut reverses = Vec::with_capacity(n);
    let mut mark_starts = Vec::with_capacity(n);
    let mut mark_ends = Vec::with_capacity(n);
    let mut marks = Vec::with_capacity(n);
    let mut settled = Vec::with_capacity(n);
    let mut nows = Vec::with_capacity(n);
    let mut rules = Map::new();
    // The group's `used` of a period is read from its first consume's sum and
    // offered by every consume of the period: a sum looked up before the
    // cache was last forgotten must not feed a later lookup's offer.
    let newest = requests.iter().map(|r| r.epoch).max();
    for request in requests {
        let entry = &request.entry;
        accounts.push(entry.account.as_str());
        resources.push(entry.resource.as_str());
        amounts.push(entry.amount.minor());
        occurred_at.push(entry.occurred_at);
        keys.push(entry.idempotency_key.as_str());
        sources.push(entry.source.as_deref());
        metadata.push(entry.metadata.as_deref());
        reverses.push(entry.reverses);
        mark_starts.push(request.likely.0);
        mark_ends.push(request.likely.1);
        let known = request.known.filter(|_| Some(request.epoch) == newest);
        marks.push(known.map(|k| k.mark));
        settled.push(known.map(|k| k.sum));
        nows.push(request.now);
        rules
            .entry(entry.resource.as_str())
            .or_insert_with(|| rules_json(&request.rules));
    }
    // Every request of a group shares the catalog, hence its default plan.
    let default_plan = requests.first().map(|r| r.rules.default_plan.as_str());
    // A group without a dated consume skips the second lookups altogether
    // (migration 0016 says what they cost).
    let dated = nows.iter().any(Option::is_some);
    let sql = if dated {
        "SELECT idx, outcome, entry_id, used, context, period_start, period_end, mark, settled
           FROM tally_consume_group_dated($1, $2::jsonb, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $16, $15)"
    } else {
        "SELECT idx, outcome, entry_id, used, context, period_start, period_end, mark, settled
           FROM tally_consume_group($1, $2::jsonb, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
    };
    let query = sqlx::query_as(sql)
        .bind(default_plan)
        .bind(Value::Object(rules).to_string())
        .bind(&accounts)
        .bind(&resources)
        .bind(&amounts)
        .bind(&occurred_at)
        .bind(&keys)
        .bind(&sources)
        .bind(&metadata)
        .bind(&reverses)
        .bind(&mark_starts)
        .bind(&mark_ends)
        .bind(&marks)
        .bind(&settled)
        // Recorded by this process's clock, as posted entries are (migration 0019).
        .bind(chrono::Utc::now());
    let query = if dated { query.bind(&nows) } else { query };
    Ok(query.fetch_all(pool).await?)
}

/// One resource's rules as `tally_consume_group` reads them.
fn rules_json(rules: &ConsumeRules) -> Value {
    let plans: Map<String, Value> = rules
        .plans
        .iter()
        .map(|rule| {
            (
                rule.plan.clone(),
                json!({
                    "limit": rule.limit,
                    "enforcement": rule.enforcement.as_str(),
                    "window": rule.window.as_str(),
                    "price": rule.overage_price,
                }),
            )
        })
        .collect();
    Value::Object(plans)
}
