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

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::NaiveDate;

use crate::domain::plan::Period;

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

/// Settled sums by (account, resource, period).
#[derive(Debug, Default)]
pub struct SettledSums {
    map: Mutex<HashMap<Key, Settled>>,
}

fn key(account: &str, resource: &str, (start, end): Bounds) -> Key {
    (account.to_owned(), resource.to_owned(), start, end)
}

impl SettledSums {
    /// Entries kept at most (≈ 100 bytes each).
    pub const CAPACITY: usize = 100_000;

    /// The watermark for one period, if known.
    pub fn get(&self, account: &str, resource: &str, period: Bounds) -> Option<Settled> {
        self.lock().get(&key(account, resource, period)).copied()
    }

    /// Remembers a watermark unless a higher one is already known.
    pub fn offer(&self, account: &str, resource: &str, period: Bounds, settled: Settled) {
        let mut map = self.lock();
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Settled>> {
        // A poisoned map holds only complete (mark, sum) pairs: still valid.
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets every watermark: the next read of each period is cold.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// How many periods are cached (tests).
    pub fn len(&self) -> usize {
        self.lock().len()
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
        sums.offer("a", "r", period, Settled { mark: 10, sum: 5 });
        sums.offer("a", "r", period, Settled { mark: 7, sum: 3 });
        assert_eq!(sums.get("a", "r", period), Some(Settled { mark: 10, sum: 5 }));
        sums.offer("a", "r", period, Settled { mark: 12, sum: 6 });
        assert_eq!(sums.get("a", "r", period), Some(Settled { mark: 12, sum: 6 }));
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let sums = SettledSums::default();
        let period = bounds(&Period::containing(Window::Total, chrono::Utc::now()));
        for i in 0..SettledSums::CAPACITY + 10 {
            sums.offer(&format!("a{i}"), "r", period, Settled { mark: 1, sum: 1 });
        }
        assert!(sums.len() <= SettledSums::CAPACITY);
    }
}
