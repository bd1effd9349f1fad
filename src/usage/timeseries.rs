//! Zero-filled time series of one account and resource.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use serde::Serialize;

use crate::domain::period::Granularity;
use crate::domain::{AccountId, Amount, Catalog, ResourceName};
use crate::store::{Store, StoreError};

/// The most points one series may have.
pub const MAX_POINTS: usize = 3_660;

/// One bucket of a series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Point {
    /// The bucket's first day.
    pub start: NaiveDate,
    /// Net usage in the bucket, exact.
    pub amount: Amount,
}

/// Why a series cannot be produced.
#[derive(Debug, thiserror::Error)]
pub enum SeriesError {
    /// The range is reversed, misaligned or too long; `field` is the bound
    /// to change.
    #[error("{message}")]
    Range {
        /// `from` or `to`.
        field: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The store failed, or a bucket's sum left the 64-bit range
    /// ([`StoreError::Overflow`], as every other read reports it).
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Every bucket in [from, to), ascending, zero-filled. For months, `from` and
/// `to` must be first days of months.
pub async fn timeseries(
    store: &dyn Store,
    catalog: &Catalog,
    account: &AccountId,
    resource: &ResourceName,
    granularity: Granularity,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<Point>, SeriesError> {
    // `to` is exclusive: from = to is an empty range (as in the entries
    // listing), from > to a mistake.
    if from > to {
        return Err(SeriesError::Range {
            field: "from",
            message: format!("from ({from}) must not be after to ({to})"),
        });
    }
    if granularity == Granularity::Month {
        for (name, date) in [("from", from), ("to", to)] {
            if granularity.bucket_of(date) != date {
                return Err(SeriesError::Range {
                    field: name,
                    message: format!(
                        "{name} ({date}) must be the first day of a month for granularity=month (e.g. {})",
                        granularity.bucket_of(date)
                    ),
                });
            }
        }
    }
    let buckets = granularity
        .buckets(from, to, MAX_POINTS)
        .ok_or_else(|| SeriesError::Range {
            field: "from",
            message: match granularity {
                Granularity::Day => {
                    format!("{from} to {to} is more than {MAX_POINTS} days; narrow the range or use granularity=month")
                }
                Granularity::Month => format!("{from} to {to} is more than {MAX_POINTS} months; narrow the range"),
            },
        })?;
    let decimals = super::shown_decimals(catalog, resource.as_str());
    let mut sums: BTreeMap<NaiveDate, Amount> = buckets.iter().map(|b| (*b, Amount::zero(decimals))).collect();
    // Folded totals and the tail may both name a bucket: add them.
    for (bucket, minor) in store.bucket_totals(account, resource, granularity, from, to).await? {
        if let Some(sum) = sums.get_mut(&bucket) {
            *sum = sum.checked_add(Amount::from_minor(minor, decimals)).map_err(|_| {
                let bucket = match granularity {
                    Granularity::Day => bucket.to_string(),
                    Granularity::Month => bucket.format("%Y-%m").to_string(),
                };
                StoreError::overflow(&format!("{account}'s {resource} in {bucket}"))
            })?;
        }
    }
    Ok(sums
        .into_iter()
        .map(|(start, amount)| Point { start, amount })
        .collect())
}
