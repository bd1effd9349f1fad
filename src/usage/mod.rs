//! Reads and decisions over the usage totals: quota checks and consumes
//! ([`quota`]), per-minute rates ([`rate_limit`]), the account view
//! ([`account`]), feature gates ([`features`]), time series ([`timeseries`]),
//! the operator's view ([`admin`]) and rollup health. Reads of usage are
//! exact at the moment of the call: folded totals plus the ledger tail the
//! rollup has not reached yet.

pub mod account;
pub mod admin;
pub mod features;
pub mod quota;
pub mod rate_limit;
pub mod timeseries;

use chrono::{DateTime, Utc};

use crate::domain::{AccountId, Catalog, ResourceName};
use crate::store::{Store, StoreError};

/// The resource a read of the ledger names: one in the catalog, or one
/// dropped from it that the ledger still holds (of `account`, when given), so
/// its history stays readable by name (docs/plans.md). `None`: neither, a
/// typo most likely; the caller says so with the catalog's own error.
pub async fn readable_resource(
    store: &dyn Store,
    catalog: &Catalog,
    account: Option<&AccountId>,
    raw: &str,
) -> Result<Option<ResourceName>, StoreError> {
    if let Ok((name, _)) = catalog.resource(raw) {
        return Ok(Some(name.clone()));
    }
    let Ok(name) = ResourceName::parse(raw) else {
        return Ok(None);
    };
    Ok(store.ledger_has_resource(account, &name).await?.then_some(name))
}

/// The fractional digits amounts of `resource` are shown with in reads and
/// reports: the catalog's, or 0 for a resource it does not declare (dropped
/// from it, or a run without the `--plans` the server uses), whose amounts
/// then read in minor units. That case is said, since 1.25 would otherwise
/// read as 125 without a word (docs/plans.md).
pub fn shown_decimals(catalog: &Catalog, resource: &str) -> u32 {
    warn_if_undeclared(catalog, resource);
    catalog.decimals(resource)
}

/// Warns that amounts of `resource` read in minor units when the catalog
/// does not declare it (see [`shown_decimals`]).
pub fn warn_if_undeclared(catalog: &Catalog, resource: &str) {
    if let Err(unknown) = catalog.resource(resource) {
        tracing::warn!(
            resource = %resource,
            "{unknown}. Its amounts are written in minor units, as whole numbers (1.25 of a resource \
             with 2 fractional digits shows as 125); pass the catalog that declares it (--plans or \
             TALLY_PLANS)"
        );
    }
}

/// Whole seconds since the oldest unfolded entry was recorded (0 when caught up).
pub async fn rollup_lag_seconds(store: &dyn Store, now: DateTime<Utc>) -> Result<i64, StoreError> {
    Ok(store
        .oldest_unfolded()
        .await?
        .map_or(0, |oldest| (now - oldest).num_seconds().max(0)))
}
