//! The rollup: folds the ledger into daily and monthly totals, batch by batch,
//! each batch one transaction that also moves the cursor (exactly once).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;

/// The smallest batch: a batch takes the whole backlog, at least this many
/// rows and at most the engine's cap ([`Store::rollup_batch_cap`]; see
/// `next_batch_size`), so a run that keeps up folds in one batch.
pub const DEFAULT_BATCH: u32 = 50_000;

/// Where a deliberate failure is injected (tests and `TALLY_FAILPOINT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failpoint {
    /// The batch (1-based) it fires in.
    pub batch: u64,
    /// Before that batch commits, or after.
    pub stage: Stage,
    /// What happens there.
    pub action: FailAction,
}

/// When a failpoint fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Inside the transaction, after the totals and cursor were written.
    BeforeCommit,
    /// Between batches: this batch committed, the next has not begun.
    AfterCommit,
}

/// What a failpoint does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailAction {
    /// Return an error (the transaction rolls back as in a crash).
    Error,
    /// Abort the process on the spot: a real crash.
    Abort,
}

impl Failpoint {
    /// Parses `before_commit:N[:abort]` or `after_commit:N[:abort]`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let parts: Vec<&str> = raw.split(':').collect();
        let usage = || format!("failpoint {raw:?} is not STAGE:BATCH[:abort] (STAGE = before_commit | after_commit)");
        let stage = match parts.first() {
            Some(&"before_commit") => Stage::BeforeCommit,
            Some(&"after_commit") => Stage::AfterCommit,
            _ => return Err(usage()),
        };
        let batch = parts
            .get(1)
            .and_then(|n| n.parse().ok())
            .filter(|n| *n > 0)
            .ok_or_else(usage)?;
        let action = match parts.get(2) {
            None => FailAction::Error,
            Some(&"abort") => FailAction::Abort,
            Some(_) => return Err(usage()),
        };
        Ok(Self { batch, stage, action })
    }

    fn fire(&self, batch: u64, stage: Stage) -> Result<(), StoreError> {
        if self.batch != batch || self.stage != stage {
            return Ok(());
        }
        match self.action {
            FailAction::Abort => {
                eprintln!("failpoint: aborting the process in batch {batch} ({stage:?})");
                std::process::abort()
            }
            FailAction::Error => Err(StoreError::Unexpected(format!(
                "failpoint fired in batch {batch} ({stage:?})"
            ))),
        }
    }
}

/// How to run the rollup.
#[derive(Debug, Clone, Copy)]
pub struct RollupOptions {
    /// The smallest batch (a batch takes the whole backlog, up to the cap).
    pub batch_size: u32,
    /// The most rows a batch grows to while catching up; `None` takes the
    /// engine's own bound ([`Store::rollup_batch_cap`]).
    pub max_batch_size: Option<u32>,
    /// An injected failure, for tests.
    pub failpoint: Option<Failpoint>,
}

impl Default for RollupOptions {
    fn default() -> Self {
        Self {
            batch_size: DEFAULT_BATCH,
            max_batch_size: None,
            failpoint: None,
        }
    }
}

/// What a run folded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollupReport {
    /// Batches committed.
    pub batches: u64,
    /// Ledger rows folded.
    pub entries: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// The run stopped between batches because the process is shutting
    /// down; what it did not reach, the next run folds.
    pub stopped: bool,
}

impl fmt::Display for RollupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: u64, one: &'static str, many: &'static str| if n == 1 { one } else { many };
        write!(
            f,
            "folded {} {} in {} {} ({:.3} s)",
            self.entries,
            plural(self.entries, "entry", "entries"),
            self.batches,
            plural(self.batches, "batch", "batches"),
            self.elapsed.as_secs_f64()
        )?;
        if self.stopped {
            write!(
                f,
                ", then stopped for the shutdown; whatever is still unfolded waits for the next run"
            )?;
        }
        Ok(())
    }
}

/// A run that failed, with what it had committed before it did: those
/// batches stay counted, once, and the next run folds the rest.
#[derive(Debug, thiserror::Error)]
#[error("rollup failed after it {done}")]
pub struct RollupError {
    /// What the run folded and committed before it failed.
    pub done: RollupReport,
    /// Why it failed.
    #[source]
    pub source: StoreError,
}

/// Folds everything since the cursor, batch after batch, until caught up.
/// A crash at any point leaves every committed batch counted once and the
/// rest for the next run. A failure is returned, not logged: the caller says
/// it once (the job's log line, or `tally rollup`'s error).
pub async fn run(store: &dyn Store, options: &RollupOptions, metrics: &Metrics) -> Result<RollupReport, RollupError> {
    run_until(store, options, metrics, &AtomicBool::new(false)).await
}

/// [`run`], stopping between batches once `stopping` is set: a shutdown
/// then waits for one batch at most, and no batch is begun on connections
/// that are closing (which failed the run with "pool closed").
pub async fn run_until(
    store: &dyn Store,
    options: &RollupOptions,
    metrics: &Metrics,
    stopping: &AtomicBool,
) -> Result<RollupReport, RollupError> {
    let started = Instant::now();
    let mut report = RollupReport {
        batches: 0,
        entries: 0,
        elapsed: Duration::ZERO,
        stopped: false,
    };
    let cap = options
        .max_batch_size
        .unwrap_or_else(|| store.rollup_batch_cap())
        .max(1);
    let mut last_full_batch = 0;
    let result = loop {
        if stopping.load(Ordering::Acquire) {
            report.stopped = true;
            break Ok(());
        }
        let backlog = match store.unfolded_estimate().await {
            Ok(backlog) => backlog,
            Err(e) => break Err(e),
        };
        let batch_size = next_batch_size(backlog, options.batch_size, last_full_batch, cap);
        let batch_no = report.batches + 1;
        let failpoint = options.failpoint;
        let before_commit = move || failpoint.map_or(Ok(()), |f| f.fire(batch_no, Stage::BeforeCommit));
        match store.rollup_batch(batch_size, &before_commit).await {
            Ok(0) => break Ok(()),
            Ok(folded) => {
                report.batches = batch_no;
                report.entries += folded;
                metrics.entries_folded.inc_by(folded);
                if let Some(f) = options.failpoint
                    && let Err(e) = f.fire(batch_no, Stage::AfterCommit)
                {
                    break Err(e);
                }
                if folded < u64::from(batch_size) {
                    break Ok(());
                }
                last_full_batch = batch_size;
            }
            Err(e) => break Err(e),
        }
    };
    report.elapsed = started.elapsed();
    // Said by the caller, once: the job's log line, or `tally rollup`'s output.
    match result {
        Ok(()) => {
            metrics.rollup_runs.inc();
            metrics.rollup_failures_in_a_row.set(0);
            Ok(report)
        }
        Err(source) => {
            metrics.rollup_failed();
            Err(RollupError { done: report, source })
        }
    }
}

/// The size of the next batch. A batch costs about one pass over the totals
/// it touches, however few rows it folds, so a batch takes the whole backlog:
/// at least `floor`, and twice the last full batch should the estimate run
/// low, but never more than `cap`.
fn next_batch_size(backlog: u64, floor: u32, last_full_batch: u32, cap: u32) -> u32 {
    let wanted = backlog
        .max(u64::from(floor))
        .max(u64::from(last_full_batch) * 2)
        .min(u64::from(cap))
        .max(1);
    u32::try_from(wanted).unwrap_or(cap)
}

#[cfg(test)]
mod tests {
    use super::next_batch_size;

    #[test]
    fn a_batch_takes_the_backlog_between_the_floor_and_the_cap() {
        assert_eq!(next_batch_size(120, 50_000, 0, 1_000_000), 50_000);
        assert_eq!(next_batch_size(700_000, 50_000, 0, 1_000_000), 700_000);
        assert_eq!(next_batch_size(9_000_000, 50_000, 0, 1_000_000), 1_000_000);
    }

    #[test]
    fn an_estimate_running_low_still_doubles_the_last_full_batch() {
        assert_eq!(next_batch_size(10, 50_000, 50_000, 1_000_000), 100_000);
        assert_eq!(next_batch_size(10, 10, 10, 10), 10);
    }
}
