//! The operator's view of the platform: totals, active accounts, plans,
//! estimated revenue, top accounts.

use std::collections::{BTreeMap, BTreeSet};

use chrono::NaiveDate;
use futures_util::TryStreamExt;
use rust_decimal::Decimal;
use serde::Serialize;

use crate::domain::period::Granularity;
use crate::domain::{Amount, Catalog, ResourceName};
use crate::export::ExportError;
use crate::export::invoice::for_each_invoice;
use crate::store::{ExportFilter, Store, StoreError};

/// How many accounts [`top`] may list.
pub const TOP_LIMITS: std::ops::RangeInclusive<u16> = 1..=1000;
/// How many accounts [`top`] lists when not told.
pub const TOP_DEFAULT: u16 = 10;

/// The month the admin reads report when none is given: the one holding `now` (UTC).
pub fn this_month(now: chrono::DateTime<chrono::Utc>) -> NaiveDate {
    Granularity::Month.bucket_of(now.date_naive())
}

/// What can go wrong computing the platform's [`stats`].
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// Reading the totals failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Computing the month's invoices failed.
    #[error("{0}")]
    Invoices(#[from] ExportError),
    /// An invoice came without its plan line (a bug).
    #[error("the invoice of '{0}' has no plan line")]
    NoPlanLine(String),
}

/// One resource's totals in a period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourceTotal {
    /// Resource.
    pub resource: String,
    /// Net amount, exact.
    pub amount: String,
    /// Entries counted.
    pub entries: i64,
    /// Accounts with entries for it.
    pub accounts: u64,
}

/// `GET /v1/admin/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// `YYYY-MM`.
    pub period: String,
    /// Per resource.
    pub totals: Vec<ResourceTotal>,
    /// Accounts with any entry in the period.
    pub active_accounts: u64,
    /// Accounts on the period's invoices (usage in it, or a plan assigned before its
    /// end) per plan in force on its last day.
    pub accounts_per_plan: BTreeMap<String, u64>,
    /// The sum of the period's invoice totals (each rounded to the cent).
    pub estimated_revenue: String,
}

/// Platform totals for the month starting `month`.
pub async fn stats(store: &dyn Store, catalog: &Catalog, month: NaiveDate) -> Result<Stats, StatsError> {
    let filter = ExportFilter {
        from: month,
        to: Granularity::Month.next(month),
        account: None,
        resource: None,
        as_of: None,
    };
    // Added in 128 bits: every account's total fits 64 bits of minor units,
    // their sum over the platform need not (it used to fail the stats).
    let mut per_resource: BTreeMap<String, (i128, i64, u64)> = BTreeMap::new();
    let mut active = BTreeSet::new();
    let mut rows = store.stream_totals(Granularity::Month, &filter);
    while let Some(row) = rows.try_next().await? {
        let slot = per_resource.entry(row.resource.clone()).or_default();
        slot.0 += i128::from(row.amount);
        slot.1 += row.entries;
        slot.2 += 1;
        active.insert(row.account);
    }
    drop(rows);
    // Counted from the invoices, so that the accounts and plans agree with
    // the revenue and the invoice export: every account with usage in the
    // month or a plan assigned before its end, under the plan its plan line
    // names (the one in force on the month's last day).
    let mut accounts_per_plan: BTreeMap<String, u64> = BTreeMap::new();
    let mut revenue = Decimal::ZERO;
    for_each_invoice::<StatsError>(store, catalog, month, None, None, |invoice| {
        let plan_line = invoice
            .lines
            .first()
            .ok_or_else(|| StatsError::NoPlanLine(invoice.account.clone()))?;
        *accounts_per_plan.entry(plan_line.plan.clone()).or_default() += 1;
        revenue += invoice.total;
        Ok(())
    })
    .await?;
    let totals = per_resource
        .into_iter()
        .map(|(resource, (amount, entries, accounts))| {
            Ok(ResourceTotal {
                amount: wide_amount_text(amount, super::shown_decimals(catalog, &resource))
                    .ok_or_else(|| StoreError::overflow(&format!("the platform total of {resource}")))?,
                resource,
                entries,
                accounts,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(Stats {
        period: month.format("%Y-%m").to_string(),
        totals,
        active_accounts: active.len() as u64,
        accounts_per_plan,
        estimated_revenue: format!("{:.2}", revenue.round_dp(2)),
    })
}

/// `minor` units of a resource with `decimals` fractional digits, written
/// as [`Amount`] writes one, for sums wider than an amount (None past the
/// 96 bits a decimal holds, some 10^28).
fn wide_amount_text(minor: i128, decimals: u32) -> Option<String> {
    Decimal::try_from_i128_with_scale(minor, decimals)
        .ok()
        .map(|d| d.normalize().to_string())
}

/// A top list, as the API and `tally top` print it (fields in that order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopList {
    /// The month, `YYYY-MM`.
    pub period: String,
    /// The resource ranked.
    pub resource: ResourceName,
    /// Largest first.
    pub accounts: Vec<TopAccount>,
}

/// One line of a top list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopAccount {
    /// Account.
    pub account: String,
    /// Net usage in the period.
    pub amount: String,
}

/// The `limit` accounts that used the most of `resource` in the month, largest first
/// (ties by account id).
pub async fn top(
    store: &dyn Store,
    catalog: &Catalog,
    resource: &ResourceName,
    month: NaiveDate,
    limit: usize,
) -> Result<TopList, StoreError> {
    let filter = ExportFilter {
        from: month,
        to: Granularity::Month.next(month),
        account: None,
        resource: Some(resource.clone()),
        as_of: None,
    };
    // A bounded heap: memory is `limit`, however many accounts.
    let mut best: std::collections::BinaryHeap<std::cmp::Reverse<(i64, std::cmp::Reverse<String>)>> =
        std::collections::BinaryHeap::new();
    let mut rows = store.stream_totals(Granularity::Month, &filter);
    while let Some(row) = rows.try_next().await? {
        best.push(std::cmp::Reverse((row.amount, std::cmp::Reverse(row.account))));
        if best.len() > limit {
            best.pop();
        }
    }
    let decimals = super::shown_decimals(catalog, resource.as_str());
    let mut top: Vec<(i64, String)> = best
        .into_iter()
        .map(|std::cmp::Reverse((a, std::cmp::Reverse(n)))| (a, n))
        .collect();
    top.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    Ok(TopList {
        period: month.format("%Y-%m").to_string(),
        resource: resource.clone(),
        accounts: top
            .into_iter()
            .map(|(amount, account)| TopAccount {
                account,
                amount: Amount::from_minor(amount, decimals).to_string(),
            })
            .collect(),
    })
}
