//! What time it is for the HTTP handlers: the system clock, or an instant
//! frozen by a test.
//!
//! Answers such as `Retry-After` depend on "now" as well as on the instant a
//! request names; tests freeze the clock to judge instants like 23:59:30 on a
//! month's last day without waiting for one.

use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};

/// The handlers' clock. Clones share one setting.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    frozen: Arc<RwLock<Option<DateTime<Utc>>>>,
}

impl Clock {
    /// The current instant: the system's, unless frozen.
    pub fn now(&self) -> DateTime<Utc> {
        self.frozen
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .unwrap_or_else(Utc::now)
    }

    /// From now on [`Clock::now`] answers `at` (tests).
    pub fn freeze_at(&self, at: DateTime<Utc>) {
        *self.frozen.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(at);
    }

    /// Back to the system's time (tests).
    pub fn thaw(&self) {
        *self.frozen.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}
