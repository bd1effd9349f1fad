//! Per-minute rate limits, in process (GCRA via governor). Quotas live in the
//! database; rates are short-lived and per replica, like any API gateway's.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// A GCRA limiter keyed by (account, resource).
type KeyedLimiter = DefaultKeyedRateLimiter<(String, String)>;

/// Rate limiters keyed by (account, resource), one per distinct rate.
#[derive(Default)]
pub struct RateLimits {
    by_rate: Mutex<HashMap<u32, Arc<KeyedLimiter>>>,
}

/// Why a request may not pass now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    /// Within the rate; the units were counted.
    Allowed,
    /// Over the rate; it would pass after this long.
    RetryAfter(Duration),
    /// More units than a whole minute's budget: it can never pass.
    NeverFits,
}

impl RateLimits {
    /// Counts `units` against `per_minute` for (account, resource), if they fit now.
    pub fn check(&self, per_minute: u32, account: &str, resource: &str, units: u32) -> RateDecision {
        let (Some(rate), Some(units)) = (NonZeroU32::new(per_minute), NonZeroU32::new(units)) else {
            return RateDecision::Allowed;
        };
        // The map's lock is released at the end of this statement.
        let limiter = self
            .by_rate()
            .entry(per_minute)
            .or_insert_with(|| Arc::new(KeyedLimiter::keyed(Quota::per_minute(rate))))
            .clone();
        match limiter.check_key_n(&(account.to_owned(), resource.to_owned()), units) {
            Ok(Ok(())) => RateDecision::Allowed,
            Ok(Err(not_until)) => RateDecision::RetryAfter(not_until.wait_time_from(DefaultClock::default().now())),
            Err(_) => RateDecision::NeverFits,
        }
    }

    /// The limiters by rate. A poisoned map is still whole (a panic cannot
    /// leave half an entry), so it is used as it is.
    fn by_rate(&self) -> MutexGuard<'_, HashMap<u32, Arc<KeyedLimiter>>> {
        self.by_rate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets keys idle long enough to be indistinguishable from fresh ones,
    /// so memory stays bounded by the accounts active in the last minute.
    pub fn retain_recent(&self) {
        let limiters: Vec<_> = self.by_rate().values().cloned().collect();
        for limiter in limiters {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}
