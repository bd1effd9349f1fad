//! Reads of an account's usage for dashboards and operators: time series and
//! rollup health. Exact at the moment of the call: folded totals plus the
//! ledger tail the rollup has not reached yet.

pub mod account;
pub mod admin;
pub mod features;
pub mod quota;
pub mod rate_limit;
pub mod timeseries;

use chrono::{DateTime, Utc};

use crate::store::{Store, StoreError};

/// Whole seconds since the oldest unfolded entry was recorded (0 when caught up).
pub async fn rollup_lag_seconds(store: &dyn Store, now: DateTime<Utc>) -> Result<i64, StoreError> {
    Ok(store
        .oldest_unfolded()
        .await?
        .map_or(0, |oldest| (now - oldest).num_seconds().max(0)))
}
