//! Invoice previews: what each account owes for a month, exact.
//!
//! The rules (docs/reports.md):
//! - Each UTC day of the month is billed at the plan in force when that day
//!   closes (its last instant); a plan's price is pro-rated by the days it was in force
//!   (price × days ÷ days in the month). One `plan` line per account (API.md):
//!   it names the plan in force on the month's last day, and its amount
//!   carries every plan's share.
//! - Each day is judged by its own plan and overrides (those in force at its
//!   closing instant, overrides from their history, so a later change never
//!   rewrites a past bill). Day window: that day's excess over that day's
//!   limit. Month window: the excess the day itself adds, over that day's
//!   limit, of the month's running usage (what consume judged); a negative
//!   day takes month-window excess back, the latest billed first, at the
//!   price it was billed at (never below 0; day-window excess is each day's
//!   own and stays billed). Each day's overage is billed at that day's price,
//!   so a downgrade on the last day neither waives nor re-prices the excess
//!   of the days before. A running balance (`total`) is not billed by overage.
//! - Overage is billed only for soft limits with an overage price; a hard
//!   limit's excess (possible through posted entries) shows but costs 0.
//! - Line amounts are exact (rust_decimal). An account's total (for admin
//!   stats) is rounded once, to the cent, half away from zero; it is not a
//!   line, so summing `amount_due` never counts an account twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use futures_util::TryStreamExt;
use rust_decimal::{Decimal, RoundingStrategy};

use super::{CsvOutput, ExportError};
use crate::domain::catalog::{Enforcement, PLAN_LINE_RESOURCE, Window};
use crate::domain::period::{Granularity, start_of};
use crate::domain::plan::{Override, OverrideChange, PlanAssignment, overrides_as_of};
use crate::domain::{AccountId, Amount, Catalog, ResourceName};
use crate::store::{ExportFilter, Store, StoreError, TotalRow};
use crate::usage::quota::{effective_limit, plan_at};

/// Header of an invoice export (API.md).
pub const INVOICE_HEADER: [&str; 8] = [
    "account",
    "plan",
    "resource",
    "used",
    "included",
    "overage",
    "unit_price",
    "amount_due",
];

/// One line of an invoice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceLine {
    /// Account.
    pub account: String,
    /// The plan the line is billed under.
    pub plan: String,
    /// A resource, or `plan`.
    pub resource: String,
    /// Units used (days on the plan for a plan line).
    pub used: String,
    /// Units included (days in the month for a plan line; `unlimited`).
    pub included: String,
    /// Units over the limit.
    pub overage: String,
    /// Price per unit over (the monthly price for a plan line).
    pub unit_price: String,
    /// Exact amount.
    pub amount_due: Decimal,
}

impl InvoiceLine {
    /// The CSV fields.
    pub fn record(&self) -> [String; 8] {
        [
            self.account.clone(),
            self.plan.clone(),
            self.resource.clone(),
            self.used.clone(),
            self.included.clone(),
            self.overage.clone(),
            self.unit_price.clone(),
            self.amount_due.normalize().to_string(),
        ]
    }
}

/// One account's invoice for a month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    /// Account.
    pub account: String,
    /// The plan line, then one line per resource.
    pub lines: Vec<InvoiceLine>,
    /// The sum of the lines, rounded once to the cent (half away from zero).
    pub total: Decimal,
    /// Plans the account was on during the month that the catalog lacks:
    /// billed at 0, limiting nothing.
    pub unknown_plans: Vec<String>,
}

/// Everything invoicing needs besides usage.
pub struct InvoiceContext<'a> {
    catalog: &'a Catalog,
    month: NaiveDate,
    days: Vec<NaiveDate>,
    assignments: HashMap<String, Vec<PlanAssignment>>,
    overrides: HashMap<String, Vec<OverrideChange>>,
}

impl<'a> InvoiceContext<'a> {
    /// Loads plan histories and overrides for invoicing `month` (its first
    /// day). With `as_of`, as they were then: plan assignments and override
    /// changes made after it are left out, as the entries recorded after it
    /// are.
    pub async fn load(
        store: &dyn Store,
        catalog: &'a Catalog,
        month: NaiveDate,
        as_of: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Self, StoreError> {
        let mut assignments: HashMap<String, Vec<PlanAssignment>> = HashMap::new();
        for (account, assignment) in store.all_plan_assignments().await? {
            if as_of.is_none_or(|t| assignment.created_at <= t) {
                assignments.entry(account).or_default().push(assignment);
            }
        }
        let mut overrides: HashMap<String, Vec<OverrideChange>> = HashMap::new();
        for (account, change) in store.override_history(as_of).await? {
            overrides.entry(account).or_default().push(change);
        }
        Ok(Self::new(catalog, month, assignments, overrides))
    }

    /// The context for `month` (its first day) from plan histories and
    /// override changes already read, by account.
    fn new(
        catalog: &'a Catalog,
        month: NaiveDate,
        assignments: HashMap<String, Vec<PlanAssignment>>,
        overrides: HashMap<String, Vec<OverrideChange>>,
    ) -> Self {
        let end = Granularity::Month.next(month);
        let days = month.iter_days().take_while(|d| *d < end).collect();
        Self {
            catalog,
            month,
            days,
            assignments,
            overrides,
        }
    }

    /// Accounts assigned a plan effective before the month's end: they get
    /// an invoice even without usage (they may owe a price). An account
    /// only kept on a former default is billed as the default's accounts
    /// are, for months with usage.
    pub fn assigned_accounts(&self) -> BTreeSet<String> {
        let end = start_of(Granularity::Month.next(self.month));
        self.assignments
            .iter()
            .filter(|(_, history)| {
                history
                    .iter()
                    .any(|a| a.effective_at < end && !a.keeps_a_former_default())
            })
            .map(|(account, _)| account.clone())
            .collect()
    }

    /// The invoice of one account from its daily totals in the month.
    pub fn invoice(&self, account: &str, daily: &[TotalRow]) -> Result<Invoice, StoreError> {
        let overflow = || StoreError::overflow(&format!("the usage of account '{account}'"));
        let history = self.assignments.get(account).map(Vec::as_slice).unwrap_or_default();
        let override_history = self.overrides.get(account).map(Vec::as_slice).unwrap_or_default();
        let plans: Vec<&str> = self
            .days
            .iter()
            .map(|d| plan_at(self.catalog, history, closing_instant(*d)))
            .collect();
        let overrides: Vec<Vec<Override>> = self
            .days
            .iter()
            .map(|d| overrides_as_of(override_history, closing_instant(*d)))
            .collect();
        let days_in_month = Decimal::from(self.days.len());
        let last_plan = plans.last().copied().unwrap_or(self.catalog.default_plan.as_str());
        let mut lines = Vec::new();

        // The plan line: the last day's plan, its days and price; the amount
        // is every plan's price pro-rated by its days (plans in order of
        // first appearance).
        let mut seen = Vec::new();
        for plan in &plans {
            if !seen.contains(plan) {
                seen.push(*plan);
            }
        }
        let price_of_plan = |plan: &str| self.catalog.plans.get(plan).map_or(Decimal::ZERO, |p| p.price);
        let days_on = |plan: &str| plans.iter().filter(|p| **p == plan).count();
        lines.push(InvoiceLine {
            account: account.to_owned(),
            plan: last_plan.to_owned(),
            resource: PLAN_LINE_RESOURCE.into(),
            used: days_on(last_plan).to_string(),
            included: self.days.len().to_string(),
            overage: String::new(),
            unit_price: price_of_plan(last_plan).normalize().to_string(),
            amount_due: seen
                .iter()
                .map(|plan| price_of_plan(plan) * Decimal::from(days_on(plan)) / days_in_month)
                .sum(),
        });

        // Resource lines: every resource a plan in force lists, or an
        // override set on one of the month's days touches, that is limited
        // on at least one day.
        let mut resources: BTreeSet<ResourceName> = seen
            .iter()
            .filter_map(|p| self.catalog.plans.get(*p))
            .flat_map(|p| p.limits.keys().cloned())
            .collect();
        resources.extend(overrides.iter().flatten().map(|o| o.resource.clone()));
        let mut used_by_day: HashMap<(&str, NaiveDate), i64> = HashMap::new();
        for row in daily {
            let slot = used_by_day.entry((row.resource.as_str(), row.bucket)).or_default();
            *slot = slot.checked_add(row.amount).ok_or_else(overflow)?;
        }
        for resource in resources {
            let decimals = self.catalog.decimals(resource.as_str());
            let amount = |minor: i64| Amount::from_minor(minor, decimals);
            let day_used: Vec<i64> = self
                .days
                .iter()
                .map(|d| used_by_day.get(&(resource.as_str(), *d)).copied().unwrap_or(0))
                .collect();
            let used = day_used
                .iter()
                .try_fold(0i64, |sum, d| sum.checked_add(*d))
                .ok_or_else(overflow)?;
            let last_day = *self.days.last().expect("a month has days");
            let last = effective_limit(
                self.catalog,
                last_plan,
                overrides.last().map(Vec::as_slice).unwrap_or_default(),
                &resource,
                closing_instant(last_day),
            );
            let price_of = |l: &crate::usage::quota::EffectiveLimit| match l.enforcement {
                Enforcement::Soft => l.overage_price.unwrap_or(Decimal::ZERO),
                Enforcement::Hard => Decimal::ZERO,
            };
            // The excess billed so far, in the order it was billed, each part
            // at its own price: a correction takes back the latest first.
            // (Day windows' excess is each day's own and never taken back,
            // so only month-window excess goes where a correction can reach.)
            let mut billed: Vec<(i64, Decimal)> = Vec::new();
            let mut billed_by_day: Vec<(i64, Decimal)> = Vec::new();
            let mut month_to_date = 0i64;
            let mut limited_on_some_day = false;
            for (i, day) in self.days.iter().enumerate() {
                let before = month_to_date;
                month_to_date = month_to_date.checked_add(day_used[i]).ok_or_else(overflow)?;
                let limit = effective_limit(self.catalog, plans[i], &overrides[i], &resource, closing_instant(*day));
                limited_on_some_day |= limit.limit.is_some();
                let excess = |used: i64, cap: i64| used.saturating_sub(cap).max(0);
                let over = match (limit.window, limit.limit) {
                    (Window::Total, _) | (_, None) => 0,
                    (Window::Day, Some(cap)) => excess(day_used[i], cap.minor()),
                    // What this day adds to the month's excess, judged by this
                    // day's limit: a limit changed today re-bills nothing of
                    // the days before; a negative day takes excess back.
                    (Window::Month, Some(cap)) => {
                        excess(month_to_date, cap.minor()).saturating_sub(excess(before, cap.minor()))
                    }
                };
                match limit.window {
                    Window::Day if over > 0 => billed_by_day.push((over, price_of(&limit))),
                    _ if over > 0 => billed.push((over, price_of(&limit))),
                    _ => take_back(&mut billed, over.saturating_neg()),
                }
            }
            billed.extend(billed_by_day);
            // API.md: a line per *limited* resource. A plan may list a
            // resource as unlimited; unlimited all month, it bills nothing.
            if !limited_on_some_day {
                continue;
            }
            let overage = billed
                .iter()
                .try_fold(0i64, |sum, (units, _)| sum.checked_add(*units))
                .ok_or_else(overflow)?;
            let amount_due = billed
                .iter()
                .map(|(units, price)| amount(*units).to_decimal() * price)
                .sum();
            lines.push(InvoiceLine {
                account: account.to_owned(),
                plan: last_plan.to_owned(),
                resource: resource.to_string(),
                used: amount(used).to_string(),
                included: last.limit.map_or_else(|| "unlimited".to_owned(), |l| l.to_string()),
                overage: amount(overage).to_string(),
                unit_price: price_of(&last).normalize().to_string(),
                amount_due,
            });
        }

        let total = lines
            .iter()
            .map(|l| l.amount_due)
            .sum::<Decimal>()
            .round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
        let unknown_plans = seen
            .iter()
            .filter(|plan| !self.catalog.plans.contains_key(**plan))
            .map(|plan| (*plan).to_owned())
            .collect();
        Ok(Invoice {
            account: account.to_owned(),
            lines,
            total,
            unknown_plans,
        })
    }
}

/// Computes every account's invoice for `month` (first day), in account order,
/// streaming usage account by account: every account with usage in the
/// month or a plan assigned before its end. `account` narrows to one.
/// `each` fails with an error of its own, into which this function's
/// [`ExportError`]s convert.
pub async fn for_each_invoice<E: From<ExportError>>(
    store: &dyn Store,
    catalog: &Catalog,
    month: NaiveDate,
    account: Option<&AccountId>,
    as_of: Option<chrono::DateTime<chrono::Utc>>,
    mut each: impl FnMut(Invoice) -> Result<(), E>,
) -> Result<(), E> {
    if month.day() != 1 {
        return Err(ExportError::NotAMonth(month).into());
    }
    let context = InvoiceContext::load(store, catalog, month, as_of)
        .await
        .map_err(ExportError::from)?;
    let filter = ExportFilter {
        from: month,
        to: Granularity::Month.next(month),
        account: account.cloned(),
        resource: None,
        as_of,
    };
    // Accounts with a plan but maybe no usage, merged in account order.
    let mut assigned: Vec<String> = context
        .assigned_accounts()
        .into_iter()
        .filter(|a| account.is_none_or(|only| only.as_str() == a))
        .rev()
        .collect();
    // Accounts per plan the catalog lacks, said once at the end: finance
    // would otherwise get a file billing them 0 without a word.
    let mut unknown: BTreeMap<String, usize> = BTreeMap::new();
    let mut emit = |name: &str, rows: &[TotalRow]| -> Result<(), E> {
        let invoice = context.invoice(name, rows).map_err(ExportError::from)?;
        for plan in &invoice.unknown_plans {
            *unknown.entry(plan.clone()).or_default() += 1;
        }
        each(invoice)
    };
    let mut rows = store.stream_totals(Granularity::Day, &filter);
    let mut current: Option<String> = None;
    let mut pending: Vec<TotalRow> = Vec::new();
    while let Some(row) = rows.try_next().await.map_err(ExportError::from)? {
        if current.as_deref() != Some(row.account.as_str()) {
            if let Some(name) = current.take() {
                emit(&name, &pending)?;
                pending.clear();
            }
            while assigned.last().is_some_and(|a| a.as_str() < row.account.as_str()) {
                emit(&assigned.pop().expect("checked"), &[])?;
            }
            if assigned.last().is_some_and(|a| a == &row.account) {
                assigned.pop();
            }
            current = Some(row.account.clone());
        }
        pending.push(row);
    }
    if let Some(name) = current {
        emit(&name, &pending)?;
    }
    while let Some(name) = assigned.pop() {
        emit(&name, &[])?;
    }
    for (plan, accounts) in unknown {
        tracing::warn!(
            plan = %plan,
            accounts,
            "plan '{plan}' is not in the catalog, yet {accounts} account(s) were on it in {}: those days are \
             billed 0 and limit nothing; pass the catalog that has it (--plans or TALLY_PLANS); known plans: {}",
            month.format("%Y-%m"),
            catalog.plan_names()
        );
    }
    Ok(())
}

/// Writes the invoice CSV for `month`. Returns the rows written.
pub async fn export_invoices(
    store: &dyn Store,
    catalog: &Catalog,
    month: NaiveDate,
    account: Option<&AccountId>,
    as_of: Option<chrono::DateTime<chrono::Utc>>,
    out: &mut CsvOutput,
) -> Result<u64, ExportError> {
    out.header(&INVOICE_HEADER)?;
    for_each_invoice::<ExportError>(store, catalog, month, account, as_of, |invoice| {
        for line in &invoice.lines {
            out.row(line.record())?;
        }
        Ok(())
    })
    .await?;
    Ok(out.rows())
}

/// Takes `units` of excess back from `billed`, latest first, each part at the
/// price it was billed at: a correction never credits more than was charged
/// for the units it removes, nor leaves billed excess that no longer exists
/// (docs/reports.md). Nothing to take back when `units` ≤ 0.
fn take_back(billed: &mut Vec<(i64, Decimal)>, mut units: i64) {
    while units > 0 {
        let Some((last, _)) = billed.last_mut() else { return };
        let taken = units.min(*last);
        *last -= taken;
        units -= taken;
        if *last == 0 {
            billed.pop();
        }
    }
}

/// The last instant (µs) of UTC day `day`: a day is billed and judged by the
/// plan and overrides in force when it closes, the ones its last consumes
/// were decided by (an upgrade at 17:29 lets that day's usage count against
/// the new plan's limit, as consume did from 17:29 on).
fn closing_instant(day: NaiveDate) -> DateTime<Utc> {
    start_of(day.succ_opt().expect("a day before the end of time")) - chrono::Duration::microseconds(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An account's total (admin stats' estimated revenue, review BF) is
    /// rounded once to the cent, half away from zero, as the module says:
    /// 10.005 is 10.01 (half to even, banker's rounding, made it 10.00).
    #[test]
    fn an_accounts_total_is_rounded_half_away_from_zero() {
        let catalog = Catalog::builtin();
        let month = NaiveDate::from_ymd_opt(2026, 9, 1).expect("a date");
        let pro = PlanAssignment {
            plan: "pro".into(),
            effective_at: start_of(month),
            created_at: start_of(month),
        };
        let context = InvoiceContext::new(
            &catalog,
            month,
            HashMap::from([("acme".to_owned(), vec![pro])]),
            HashMap::new(),
        );
        // Pro all month (10) and 250 tokens over its daily 50 000 at 0.00002.
        let day = TotalRow {
            account: "acme".into(),
            resource: "llm_tokens".into(),
            bucket: month,
            amount: 50_250,
            entries: 1,
        };
        let invoice = context.invoice("acme", &[day]).expect("an invoice");
        let lines: Decimal = invoice.lines.iter().map(|l| l.amount_due).sum();
        assert_eq!(lines, Decimal::new(10_005, 3));
        assert_eq!(invoice.total, Decimal::new(1_001, 2));
    }
}
