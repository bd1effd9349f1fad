//! Settled sums: an exact, in-process cache that makes `used` cost the rows
//! recorded since the last read, not the whole unfolded tail.
//!
//! For one (account, resource, period) the cache keeps a watermark `mark` and
//! `settled`, the sum of the period's ledger rows below it. "Below the mark"
//! is chosen so that those rows can never change:
//!
//! - PostgreSQL: `tx_id < pg_snapshot_xmin` of the snapshot that summed them.
//!   Such a transaction has finished, and no new transaction can get a lower
//!   id; the ledger is append-only.
//! - SQLite: `id <= MAX(id)` seen by the read that summed them. One writer and
//!   AUTOINCREMENT: a read sees a prefix of the ids, and ids are never reused.
//!
//! `used` is then `settled` + the period's rows at or above the mark, read in
//! one statement. That stays exact whatever happens meanwhile: rows another
//! process inserts are above the mark and counted; a rollup moves rows from
//! the tail into the totals without changing the ledger, so the settled sum
//! still holds. Any (mark, settled) pair that was once right is right forever,
//! so concurrent readers can offer theirs in any order: the highest mark wins
//! (it leaves the fewest rows to scan).
//!
//! Memory is bounded: past [`SettledSums::CAPACITY`] entries, an arbitrary
//! eighth is dropped (a dropped entry only costs one cold read).
//!
//! The one thing that breaks "right forever" is a folded total rewritten by
//! `tally verify --repair`: a settled sum read from the wrong total keeps its
//! error. Repairs are counted in the database (`totals_repairs`, migration
//! 0022); a store reads that count at most once every
//! [`SettledSums::REPAIRS_CHECK_INTERVAL`] before it uses the cache, and a
//! new count forgets every sum ([`SettledSums::repairs_counted`]). A read in
//! flight across that moment may have summed the old totals, so every offer
//! carries the [`Epoch`] its lookup saw, and an offer from before the last
//! forgetting is refused.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::NaiveDate;

use super::StoreError;

use crate::domain::plan::Period;

/// How many times `tally verify --repair` has rewritten totals (migration
/// 0022), the same on both engines. Its one row deleted by hand reads 0
/// (a move the processes notice) rather than failing every read of `used`.
pub const COUNT_REPAIRS_SQL: &str = "SELECT COALESCE((SELECT repairs FROM totals_repairs WHERE id = 1), 0)";

/// Counts one repair, in the repair's transaction; puts the row back (at 1)
/// if it was deleted by hand, so later repairs count again. A process that
/// last saw 1 and did not look while the row was missing takes the new 1
/// for the old: after deleting the row by hand, restart `serve`.
pub const COUNT_A_REPAIR_SQL: &str = "INSERT INTO totals_repairs (id, repairs) VALUES (1, 1)
     ON CONFLICT (id) DO UPDATE SET repairs = totals_repairs.repairs + 1";

/// A period's first day and the day after its last (both None: all time).
pub type Bounds = (Option<NaiveDate>, Option<NaiveDate>);

/// The bounds of a period.
pub fn bounds(period: &Period) -> Bounds {
    (period.start, period.end)
}

/// (account, resource, period start, period end).
type Key = (String, String, Option<NaiveDate>, Option<NaiveDate>);

/// A watermark and the settled sum below it, in minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// PostgreSQL: an xid8 (as i64); SQLite: a ledger id.
    pub mark: i64,
    /// Sum of the period's rows below (PostgreSQL) or up to (SQLite) `mark`.
    pub sum: i64,
}

/// How often the cache has been forgotten when a lookup was made; an offer
/// is taken only in the epoch of its lookup (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Epoch(u64);

/// What [`SettledSums::get`] found, and the epoch to offer the read's new
/// watermark in.
#[derive(Debug, Clone, Copy)]
pub struct Lookup {
    /// The watermark for the period, if known.
    pub known: Option<Settled>,
    /// Pass to [`SettledSums::offer`].
    pub epoch: Epoch,
}

/// A look at the repairs count one caller has claimed: when it was claimed
/// and when the previous look was (as in [`SettledSums::repairs_checked`]).
#[derive(Debug, Clone, Copy)]
struct RepairsLook {
    previous: u64,
    now: u64,
}

/// Settled sums by (account, resource, period).
#[derive(Debug)]
pub struct SettledSums {
    cache: Mutex<Cache>,
    /// When a look at the repairs count was last claimed (it may still be
    /// on its way; a failed one is given back), in ms since `created` plus
    /// one (0: never).
    repairs_checked: AtomicU64,
    created: Instant,
    /// Whether this process was refused the repairs count, and said so.
    refused_the_count: AtomicBool,
}

#[derive(Debug, Default)]
struct Cache {
    map: HashMap<Key, Settled>,
    epoch: u64,
    /// The database's count of repairs when last read.
    repairs: Option<i64>,
}

impl Default for SettledSums {
    fn default() -> Self {
        Self {
            cache: Mutex::default(),
            repairs_checked: AtomicU64::new(0),
            created: Instant::now(),
            refused_the_count: AtomicBool::new(false),
        }
    }
}

fn key(account: &str, resource: &str, (start, end): Bounds) -> Key {
    (account.to_owned(), resource.to_owned(), start, end)
}

impl SettledSums {
    /// Entries kept at most (≈ 100 bytes each).
    pub const CAPACITY: usize = 100_000;

    /// How often a process looks at the repairs count: after a repair
    /// commits, the process answers from sums read from the old totals until
    /// its next look, made by the first read of the cache at least this long
    /// after its previous look.
    pub const REPAIRS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

    /// The watermark for one period, if known, and the epoch to offer the
    /// read's new one in.
    pub fn get(&self, account: &str, resource: &str, period: Bounds) -> Lookup {
        let cache = self.lock();
        Lookup {
            known: cache.map.get(&key(account, resource, period)).copied(),
            epoch: Epoch(cache.epoch),
        }
    }

    /// Remembers a watermark unless a higher one is already known, or the
    /// cache was forgotten since the lookup the read began with (`epoch`):
    /// that read may have summed totals a repair has since rewritten.
    pub fn offer(&self, account: &str, resource: &str, period: Bounds, settled: Settled, epoch: Epoch) {
        let mut cache = self.lock();
        if Epoch(cache.epoch) != epoch {
            return;
        }
        let map = &mut cache.map;
        let key = key(account, resource, period);
        if let Some(known) = map.get_mut(&key) {
            if settled.mark > known.mark {
                *known = settled;
            }
            return;
        }
        if map.len() >= Self::CAPACITY {
            let mut n = 0_usize;
            map.retain(|_, _| {
                n += 1;
                !n.is_multiple_of(8)
            });
        }
        map.insert(key, settled);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A poisoned map holds only complete (mark, sum) pairs: still valid.
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets every watermark: the next read of each period is cold, and
    /// reads in flight offer theirs in vain.
    pub fn clear(&self) {
        let mut cache = self.lock();
        cache.map.clear();
        cache.epoch += 1;
    }

    /// The cache, after a look at the repairs count when one is due (once
    /// every [`Self::REPAIRS_CHECK_INTERVAL`]): `count_repairs` reads the
    /// database's count ([`COUNT_REPAIRS_SQL`]). A store calls this before
    /// every [`Self::get`]. A role refused the count (granted SELECT before
    /// migration 0022) keeps no sum past one interval instead; any other
    /// failure is the caller's, and the next caller looks again.
    pub async fn noticing_repairs<Count>(&self, count_repairs: impl FnOnce() -> Count) -> Result<&Self, StoreError>
    where
        Count: Future<Output = Result<i64, sqlx::Error>>,
    {
        let Some(claim) = self.repairs_check_due() else {
            return Ok(self);
        };
        match count_repairs().await.map_err(StoreError::from) {
            Ok(repairs) => self.repairs_counted(repairs),
            Err(e) if e.is_permission_denied() => {
                if !self.refused_the_count.swap(true, Ordering::AcqRel) {
                    let why = crate::telemetry::cause_chain(&e);
                    tracing::warn!(
                        error = %why,
                        "cannot read how many times the totals were repaired ({why}): this process keeps the \
                         sums behind `used` for a second at most; grant this role SELECT on totals_repairs \
                         (docs/operations.md, \"Read-only access\")"
                    );
                }
                self.clear();
            }
            Err(e) => {
                // Not looked: the next caller looks at once.
                let _ = self.repairs_checked.compare_exchange(
                    claim.now,
                    claim.previous,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                return Err(e);
            }
        }
        Ok(self)
    }

    /// A claim on the look at the repairs count when one is due: at first,
    /// then once every [`Self::REPAIRS_CHECK_INTERVAL`], to one caller only.
    fn repairs_check_due(&self) -> Option<RepairsLook> {
        let now = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let previous = self.repairs_checked.load(Ordering::Acquire);
        let interval = u64::try_from(Self::REPAIRS_CHECK_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if previous != 0 && now.saturating_sub(previous) < interval {
            return None;
        }
        self.repairs_checked
            .compare_exchange(previous, now, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| RepairsLook { previous, now })
    }

    /// The database's count of repairs, just read: a count other than the
    /// last one seen (or the first one seen, which may postdate sums read
    /// while it was on its way) forgets every watermark.
    fn repairs_counted(&self, repairs: i64) {
        let mut cache = self.lock();
        if cache.repairs != Some(repairs) {
            cache.repairs = Some(repairs);
            cache.map.clear();
            cache.epoch += 1;
        }
    }

    /// How many periods are cached (tests).
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::catalog::Window;

    #[test]
    fn a_higher_mark_replaces_a_lower_one_and_never_the_reverse() {
        let sums = SettledSums::default();
        let period = bounds(&Period::containing(Window::Total, chrono::Utc::now()));
        let epoch = sums.get("a", "r", period).epoch;
        sums.offer("a", "r", period, Settled { mark: 10, sum: 5 }, epoch);
        sums.offer("a", "r", period, Settled { mark: 7, sum: 3 }, epoch);
        assert_eq!(sums.get("a", "r", period).known, Some(Settled { mark: 10, sum: 5 }));
        sums.offer("a", "r", period, Settled { mark: 12, sum: 6 }, epoch);
        assert_eq!(sums.get("a", "r", period).known, Some(Settled { mark: 12, sum: 6 }));
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let sums = SettledSums::default();
        let period = bounds(&Period::containing(Window::Total, chrono::Utc::now()));
        let epoch = sums.get("a", "r", period).epoch;
        for i in 0..SettledSums::CAPACITY + 10 {
            sums.offer(&format!("a{i}"), "r", period, Settled { mark: 1, sum: 1 }, epoch);
        }
        assert!(sums.len() <= SettledSums::CAPACITY);
    }

    #[test]
    fn a_new_repairs_count_forgets_every_sum_and_refuses_reads_that_began_before_it() {
        let sums = SettledSums::default();
        let period = bounds(&Period::containing(Window::Total, chrono::Utc::now()));
        sums.repairs_counted(0);
        let before = sums.get("a", "r", period).epoch;
        sums.offer("a", "r", period, Settled { mark: 10, sum: 5 }, before);
        let in_flight = sums.get("b", "r", period).epoch;

        // The same count again: nothing forgotten.
        sums.repairs_counted(0);
        assert_eq!(sums.get("a", "r", period).known, Some(Settled { mark: 10, sum: 5 }));

        sums.repairs_counted(1);
        assert_eq!(sums.get("a", "r", period).known, None);
        // A read that looked up before the repair was noticed may hold the old total.
        sums.offer("b", "r", period, Settled { mark: 11, sum: 9 }, in_flight);
        assert_eq!(sums.get("b", "r", period).known, None);
        // A read that began after it is taken.
        let after = sums.get("b", "r", period).epoch;
        sums.offer("b", "r", period, Settled { mark: 11, sum: 9 }, after);
        assert_eq!(sums.get("b", "r", period).known, Some(Settled { mark: 11, sum: 9 }));
    }

    /// The first count a process reads may already include a repair that
    /// came after sums it read while the count was on its way: it forgets
    /// them, and refuses the reads in flight, as a new count does.
    #[test]
    fn the_first_repairs_count_forgets_the_sums_read_before_it() {
        let sums = SettledSums::default();
        let period = bounds(&Period::containing(Window::Total, chrono::Utc::now()));
        let before = sums.get("a", "r", period).epoch;
        sums.offer("a", "r", period, Settled { mark: 10, sum: 5 }, before);
        let in_flight = sums.get("b", "r", period).epoch;

        sums.repairs_counted(3);
        assert_eq!(sums.get("a", "r", period).known, None);
        sums.offer("b", "r", period, Settled { mark: 11, sum: 9 }, in_flight);
        assert_eq!(sums.get("b", "r", period).known, None);
    }

    #[test]
    fn clearing_refuses_reads_in_flight() {
        let sums = SettledSums::default();
        let period = bounds(&Period::containing(Window::Total, chrono::Utc::now()));
        let in_flight = sums.get("a", "r", period).epoch;
        sums.clear();
        sums.offer("a", "r", period, Settled { mark: 1, sum: 1 }, in_flight);
        assert!(sums.is_empty());
    }

    /// A look that failed (the database out of reach, say) gives its claim
    /// back: the next caller looks at once, not an interval later.
    #[tokio::test]
    async fn a_failed_look_at_the_repairs_count_is_made_again_by_the_next_caller() {
        let sums = SettledSums::default();
        let failed = sums
            .noticing_repairs(|| async { Err::<i64, _>(sqlx::Error::PoolTimedOut) })
            .await;
        assert!(matches!(failed, Err(StoreError::Unavailable(_))), "{failed:?}");
        let mut looked = false;
        sums.noticing_repairs(|| {
            looked = true;
            async { Ok(0) }
        })
        .await
        .unwrap();
        assert!(looked, "the failed look kept its claim");
    }

    #[test]
    fn the_repairs_count_is_due_at_first_then_once_an_interval_to_one_caller() {
        let sums = SettledSums::default();
        assert!(sums.repairs_check_due().is_some());
        assert!(sums.repairs_check_due().is_none(), "claimed by the first caller");
        // As if the interval had passed since the last check.
        sums.repairs_checked.store(1, Ordering::Release);
        let sums = SettledSums {
            created: Instant::now() - SettledSums::REPAIRS_CHECK_INTERVAL - Duration::from_millis(5),
            ..sums
        };
        assert!(sums.repairs_check_due().is_some());
        assert!(sums.repairs_check_due().is_none());
    }
}
