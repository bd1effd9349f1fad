//! Quota checks and atomic consumption: which limit applies to an account at
//! an instant (plan history, overrides), how much of it is used (exact), and
//! whether one more unit may pass.

use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use super::rate_limit::{RateDecision, RateLimits};
use crate::domain::catalog::{Enforcement, Window};
use crate::domain::plan::{Override, OverrideChange, Period, PlanAssignment, overrides_as_of};
use crate::domain::{AccountId, Amount, AmountError, Catalog, NewEntry, ResourceName};
use crate::store::{ConsumeDecider, ConsumeResult, ConsumeRules, DecidedConsume, PlanRule, Store, StoreError};

/// The share of a limit from which usage is a `warning`.
pub const WARNING_PERCENT: i64 = 80;

/// The limit in force for one account and resource at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveLimit {
    /// The plan in force.
    pub plan: String,
    /// The counting window.
    pub window: Window,
    /// None: unlimited.
    pub limit: Option<Amount>,
    /// Hard or soft.
    pub enforcement: Enforcement,
    /// Price per unit over a soft limit.
    pub overage_price: Option<Decimal>,
}

/// The plan in force at `at`: the latest assignment effective by then, else the default.
pub fn plan_at<'a>(catalog: &'a Catalog, history: &'a [PlanAssignment], at: DateTime<Utc>) -> &'a str {
    history
        .iter()
        .filter(|a| a.effective_at <= at)
        .max_by_key(|a| (a.effective_at, a.created_at))
        .map_or(catalog.default_plan.as_str(), |a| a.plan.as_str())
}

/// The plans accounts are on at `at` (or later) that `catalog` does not
/// have, each with how many accounts are on it. Nothing limits those
/// accounts: a plan missing from the catalog has no limits.
pub async fn plans_missing_from_catalog(
    store: &dyn Store,
    catalog: &Catalog,
    at: DateTime<Utc>,
) -> Result<Vec<(String, i64)>, StoreError> {
    let mut in_force = store.plans_in_force(at).await?;
    in_force.retain(|(plan, _)| !catalog.plans.contains_key(plan));
    Ok(in_force)
}

/// The override of `resource` that applies at `at`, among `overrides` as set
/// by then ([`overrides_as_of`]): the one not expired by `at`.
pub fn override_at<'a>(overrides: &'a [Override], resource: &ResourceName, at: DateTime<Utc>) -> Option<&'a Override> {
    overrides.iter().find(|o| &o.resource == resource && o.active_at(at))
}

/// The limit for `resource` under `plan`, with an active override applied.
pub fn effective_limit(
    catalog: &Catalog,
    plan: &str,
    overrides: &[Override],
    resource: &ResourceName,
    at: DateTime<Utc>,
) -> EffectiveLimit {
    let base = catalog.limit(plan, resource);
    let mut effective = EffectiveLimit {
        plan: plan.to_owned(),
        window: base.map_or(Window::Month, |l| l.window),
        limit: base.and_then(|l| l.limit),
        enforcement: base.map_or(Enforcement::Hard, |l| l.enforcement),
        overage_price: base.and_then(|l| l.overage_price),
    };
    if let Some(o) = override_at(overrides, resource, at) {
        effective.limit = o.limit;
        effective.window = o.window.unwrap_or(effective.window);
        effective.enforcement = o.enforcement.unwrap_or(effective.enforcement);
    }
    effective
}

/// ok / warning (≥ 80 %) / exceeded (≥ 100 %).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageStatus {
    /// Below 80 % (or unlimited).
    Ok,
    /// From 80 % of the limit.
    Warning,
    /// At or past the limit.
    Exceeded,
}

/// The status of `used` against `limit`.
pub fn status_of(used: Amount, limit: Option<Amount>) -> UsageStatus {
    match limit {
        None => UsageStatus::Ok,
        // A zero limit with nothing used is a resource the plan does not include, not an excess.
        Some(limit) if limit.minor() == 0 && used.minor() <= 0 => UsageStatus::Ok,
        Some(limit) if used.minor() >= limit.minor() => UsageStatus::Exceeded,
        Some(limit) if i128::from(used.minor()) * 100 >= i128::from(limit.minor()) * i128::from(WARNING_PERCENT) => {
            UsageStatus::Warning
        }
        Some(_) => UsageStatus::Ok,
    }
}

/// Minor units left under `limit` after `used`, never below 0. Wide, since a
/// running balance driven far below zero by deletions would overflow a plain
/// subtraction; room past 64 bits reads as the most that fits.
fn room_under(limit: i64, used: i64) -> i64 {
    let room = (i128::from(limit) - i128::from(used)).max(0);
    i64::try_from(room).unwrap_or(i64::MAX)
}

/// The answer to "may this account use `amount` more?" — the contract's check fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaStatus {
    /// Whether the amount may pass (soft limits and unlimited always pass).
    pub allowed: bool,
    /// Account.
    pub account: String,
    /// Resource.
    pub resource: String,
    /// The plan in force.
    pub plan: String,
    /// The window.
    pub window: Window,
    /// Used in the period, exact.
    pub used: String,
    /// Null: unlimited.
    pub limit: Option<String>,
    /// Null: unlimited. Never negative.
    pub remaining: Option<String>,
    /// Hard or soft.
    pub enforcement: Enforcement,
    /// Start of the period (null for total).
    pub period_start: Option<DateTime<Utc>>,
    /// End of the period, exclusive (null for total).
    pub period_end: Option<DateTime<Utc>>,
    /// ok, warning or exceeded.
    pub status: UsageStatus,
}

impl QuotaStatus {
    fn new(
        account: &AccountId,
        resource: &ResourceName,
        limit: &EffectiveLimit,
        period: &Period,
        used: Amount,
        allowed: bool,
    ) -> Self {
        Self {
            allowed,
            account: account.to_string(),
            resource: resource.to_string(),
            plan: limit.plan.clone(),
            window: limit.window,
            used: used.to_string(),
            limit: limit.limit.map(|l| l.to_string()),
            remaining: limit
                .limit
                .map(|l| Amount::from_minor(room_under(l.minor(), used.minor()), l.decimals()).to_string()),
            enforcement: limit.enforcement,
            period_start: period.starts_at(),
            period_end: period.ends_at(),
            status: status_of(used, limit.limit),
        }
    }
}

/// A warning attached to a consume or a usage row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    /// `approaching_limit`, `limit_reached` or `soft_limit_exceeded`.
    pub code: String,
    /// The resource it is about.
    pub resource: String,
    /// For people.
    pub message: String,
}

/// The warnings `used` against `limit` deserves.
pub fn warnings_for(resource: &ResourceName, limit: &EffectiveLimit, used: Amount) -> Vec<Warning> {
    let Some(cap) = limit.limit else { return Vec::new() };
    let window = limit.window.as_str();
    let (code, message) = match (status_of(used, Some(cap)), limit.enforcement) {
        (UsageStatus::Ok, _) => return Vec::new(),
        (UsageStatus::Warning, _) => (
            "approaching_limit",
            format!(
                "{resource} is at {}% of its {window} limit ({used} of {cap})",
                percent(used, cap).unwrap_or_default()
            ),
        ),
        (UsageStatus::Exceeded, Enforcement::Soft) if used.minor() > cap.minor() => (
            "soft_limit_exceeded",
            match limit.overage_price {
                Some(price) => format!(
                    "{resource} is over its soft {window} limit ({used} of {cap}); overage is billed at {price} per unit"
                ),
                None => format!("{resource} is over its soft {window} limit ({used} of {cap})"),
            },
        ),
        // Over, not only at, a hard limit: posted entries are not refused,
        // and a lowered limit can sit below what was already used.
        (UsageStatus::Exceeded, _) if used.minor() > cap.minor() => (
            "limit_reached",
            format!(
                "{resource} is over its {window} limit ({used} of {cap}); {}",
                if limit.window == Window::Total {
                    "consumes are refused until some is freed or the limit is raised"
                } else {
                    "consumes in this window are refused unless the limit is raised"
                }
            ),
        ),
        (UsageStatus::Exceeded, _) => (
            "limit_reached",
            format!("{resource} has reached its {window} limit ({used} of {cap})"),
        ),
    };
    vec![Warning {
        code: code.into(),
        resource: resource.to_string(),
        message,
    }]
}

/// The warnings of a recorded consume: those of the limit at its instant,
/// then, for a dated consume also held to another limit in force now (see
/// [`Decider::judged`]), those of that limit, which say so. A soft limit in
/// force now that the consume passed is billed as overage, so the answer
/// must not stay silent about it because the limit at its date was higher.
fn consume_warnings(
    resource: &ResourceName,
    at_its_instant: (&EffectiveLimit, Amount),
    in_force_now: Option<(&EffectiveLimit, Amount)>,
) -> Vec<Warning> {
    let (limit, after) = at_its_instant;
    let mut warnings = warnings_for(resource, limit, after);
    let same_terms = |now: &EffectiveLimit, now_after: Amount| {
        (now.window, now.limit, now.enforcement, now.overage_price, now_after)
            == (limit.window, limit.limit, limit.enforcement, limit.overage_price, after)
    };
    if let Some((now, now_after)) = in_force_now.filter(|(now, now_after)| !same_terms(now, *now_after)) {
        warnings.extend(warnings_for(resource, now, now_after).into_iter().map(|mut warning| {
            warning.message.push_str(&format!(
                " (the limit in force now, on plan '{}', which holds a consume dated in its window as well as \
                 the limit at its date)",
                now.plan
            ));
            warning
        }));
    }
    warnings
}

/// used / limit in percent, cut (not rounded) to 2 decimals, so that it
/// shows 80 or 100 only when the status does: 49 999 of 50 000 is 99.99, a
/// warning, not "100" beside it (None when the limit is 0).
pub fn percent(used: Amount, limit: Amount) -> Option<Decimal> {
    if limit.minor() == 0 {
        return None;
    }
    let ratio = Decimal::from(used.minor()) * Decimal::from(100) / Decimal::from(limit.minor());
    Some(ratio.round_dp_with_strategy(2, RoundingStrategy::ToZero).normalize())
}

/// The outcome of a consume.
#[derive(Debug, Clone)]
pub enum ConsumeOutcome {
    /// Recorded (or replayed): the check fields after recording, the entry and warnings.
    Recorded {
        /// Check fields after recording.
        status: QuotaStatus,
        /// The ledger entry.
        entry_id: i64,
        /// Approaching or past a limit.
        warnings: Vec<Warning>,
        /// Whether this was a replay of an earlier consume with the same key.
        replayed: bool,
    },
    /// Over a hard limit; nothing written.
    QuotaExceeded {
        /// Check fields (used as it stands).
        status: QuotaStatus,
        /// Whole seconds until the period ends (None for total).
        retry_after: Option<u64>,
        /// Refused by the limit in force now, not the one at the consume's
        /// `occurred_at` (a consume dated earlier in the same window).
        in_force_now: bool,
    },
    /// Over a per-minute rate limit; nothing written.
    RateLimited {
        /// Whole seconds (at least 1) until it would pass.
        retry_after: u64,
        /// The rate.
        per_minute: u32,
    },
}

/// Why a consume is refused before any checking.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The amount can never fit the per-minute budget.
    #[error(
        "amount {amount} is more than the whole per-minute budget of {per_minute} for {resource}; split it or raise the plan's rate"
    )]
    LargerThanRate {
        /// Requested.
        amount: String,
        /// Resource.
        resource: String,
        /// Budget.
        per_minute: u32,
    },
    /// Recording the amount would take the window's total past 64 bits of
    /// minor units, which nothing counts exactly (no limit refused it: an
    /// unlimited or soft one; past a hard limit it is `QuotaExceeded`).
    #[error(
        "amount {amount} would take the {window} total of {resource} for account '{account}' past 64 bits of \
         minor units ({used} used), which Tally cannot count exactly; consume less at a time, or have an operator \
         correct the entries (docs/operations.md, \"A total past 64 bits\")"
    )]
    PastSixtyFourBits {
        /// Requested.
        amount: String,
        /// Resource.
        resource: String,
        /// Account.
        account: String,
        /// The window's name (`day`, `month`, `total`).
        window: &'static str,
        /// Used in the window when refused.
        used: String,
    },
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// A scheduled change of an account's limit that lets a refused consume
/// through ([`Quotas::passes_after_a_scheduled_change`]).
#[derive(Debug)]
pub struct ScheduledChange {
    /// When it comes.
    pub at: DateTime<Utc>,
    /// The plan assigned from `at`, if an assignment takes effect then.
    pub plan_takes_effect: Option<String>,
    /// Whether the resource's override expires at `at`.
    pub override_expires: bool,
    /// The check of the same amount at `at`.
    pub status: QuotaStatus,
}

/// How many instants a refusal's search for a sooner pass looks at: each
/// costs a check.
const LOOKED_AT: usize = 8;

/// When the overrides of `resource` in force at `now` expire.
fn override_expiries(changes: &[OverrideChange], resource: &ResourceName, now: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    overrides_as_of(changes, now)
        .iter()
        .filter(|o| &o.resource == resource)
        .filter_map(|o| o.expires_at)
        .collect()
}

/// The instants after `now` at which the limit of `resource` may change: a
/// plan assignment taking effect, an override expiring; in order, once each.
pub fn scheduled_changes(
    resource: &ResourceName,
    (plans, changes): (&[PlanAssignment], &[OverrideChange]),
    now: DateTime<Utc>,
) -> Vec<DateTime<Utc>> {
    let mut instants: Vec<DateTime<Utc>> = plans
        .iter()
        .map(|assignment| assignment.effective_at)
        .chain(override_expiries(changes, resource, now))
        .filter(|&at| at > now)
        .collect();
    instants.sort();
    instants.dedup();
    instants
}

/// An instant at which a refused consume passes: a scheduled change, or a
/// fresh window beginning ([`Quotas::passes_in_a_later_window`]).
#[derive(Debug, Clone)]
pub struct LaterWindow {
    /// The instant.
    pub at: DateTime<Utc>,
    /// The check of the same amount at `at`.
    pub status: QuotaStatus,
}

/// Quotas over a store and a catalog.
pub struct Quotas<'a> {
    /// The database.
    pub store: &'a dyn Store,
    /// Plans and resources.
    pub catalog: &'a Catalog,
}

impl Quotas<'_> {
    /// Whether `amount` more may be used at `at`; records nothing.
    pub async fn check(
        &self,
        account: &AccountId,
        resource: &ResourceName,
        amount: Amount,
        at: DateTime<Utc>,
    ) -> Result<QuotaStatus, StoreError> {
        Ok(self.check_with_limit(account, resource, amount, at).await?.0)
    }

    /// [`Quotas::check`], with the limit it judged by and `used`.
    async fn check_with_limit(
        &self,
        account: &AccountId,
        resource: &ResourceName,
        amount: Amount,
        at: DateTime<Utc>,
    ) -> Result<(QuotaStatus, EffectiveLimit, Amount), StoreError> {
        // Plan, overrides and `used` in the likely period in one read; a
        // second read only when the plan or an override picks another window.
        let likely = Period::containing(self.likely_window(resource), at);
        let inputs = self.store.check_inputs(account, resource, &likely).await?;
        let limit = effective_limit(
            self.catalog,
            plan_at(self.catalog, &inputs.plans, at),
            &overrides_as_of(&inputs.override_changes, at),
            resource,
            at,
        );
        let period = Period::containing(limit.window, at);
        let used_minor = if period == likely {
            inputs.used
        } else {
            self.store.used(account, resource, &period).await?
        };
        let used = Amount::from_minor(used_minor, amount.decimals());
        let allowed = allows(&limit, used, amount);
        let status = QuotaStatus::new(account, resource, &limit, &period, used, allowed);
        Ok((status, limit, used))
    }

    /// The first instant after `now` and up to `until` (the refused
    /// window's end; None: no bound) at which a scheduled change of
    /// `account`'s limits on `resource` (a plan assignment that takes
    /// effect, an override that expires), from its `history` (plans and
    /// override changes, as the store reads them), lets `amount` through. A consume
    /// refused now that is sent again then, without `occurred_at`, would
    /// pass unless others use the room first: its `Retry-After` should not
    /// send the caller away until the window ends. A consume dated
    /// `held_since` (refused by the limit in force now, not by the one at its
    /// date, which took it) passes at a change whose limit no longer holds
    /// it, its window not holding that date, or whose limit takes it. Reads
    /// only on a refusal's path.
    #[expect(clippy::too_many_arguments, reason = "one refusal's facts, each used once")]
    pub async fn passes_after_a_scheduled_change(
        &self,
        account: &AccountId,
        resource: &ResourceName,
        amount: Amount,
        (plans, override_changes): (&[PlanAssignment], &[OverrideChange]),
        now: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
        held_since: Option<DateTime<Utc>>,
    ) -> Result<Option<ScheduledChange>, StoreError> {
        let expiries = override_expiries(override_changes, resource, now);
        let instants = scheduled_changes(resource, (plans, override_changes), now)
            .into_iter()
            .filter(|&at| until.is_none_or(|end| at <= end));
        for at in instants.take(LOOKED_AT) {
            let status = self.check(account, resource, amount, at).await?;
            let let_go = held_since.is_some_and(|dated| {
                let then = effective_limit(
                    self.catalog,
                    plan_at(self.catalog, plans, at),
                    &overrides_as_of(override_changes, at),
                    resource,
                    at,
                );
                !Period::containing(then.window, at).contains(dated)
            });
            if let_go || status.allowed {
                let plan_takes_effect = plans
                    .iter()
                    .filter(|assignment| assignment.effective_at == at)
                    .max_by_key(|assignment| assignment.created_at)
                    .map(|assignment| assignment.plan.clone());
                return Ok(Some(ScheduledChange {
                    at,
                    plan_takes_effect,
                    override_expires: expiries.contains(&at),
                    status,
                }));
            }
        }
        Ok(None)
    }

    /// For a consume that no scheduled change lets through in the window it
    /// counts in (see [`Quotas::passes_after_a_scheduled_change`]): the
    /// first instant it passes among the scheduled changes themselves (a
    /// later one, past this window: review AT) and the fresh windows that
    /// begin after now and after each change, each under the limit then in
    /// force. None when none of the first few does, so waiting does not
    /// help (a downgrade at the window's end, say). Only asked when a change
    /// is scheduled; without one, the next window's limit is this one's.
    pub async fn passes_in_a_later_window(
        &self,
        account: &AccountId,
        resource: &ResourceName,
        amount: Amount,
        (plans, override_changes): (&[PlanAssignment], &[OverrideChange]),
        now: DateTime<Utc>,
    ) -> Result<Option<LaterWindow>, StoreError> {
        let changes = scheduled_changes(resource, (plans, override_changes), now);
        let mut starts: Vec<DateTime<Utc>> = std::iter::once(now)
            .chain(changes.iter().copied())
            .filter_map(|at| {
                let then = effective_limit(
                    self.catalog,
                    plan_at(self.catalog, plans, at),
                    &overrides_as_of(override_changes, at),
                    resource,
                    at,
                );
                Period::containing(then.window, at).ends_at()
            })
            .collect();
        starts.extend(changes);
        starts.sort();
        starts.dedup();
        for at in starts.into_iter().take(LOOKED_AT) {
            let status = self.check(account, resource, amount, at).await?;
            if status.allowed {
                return Ok(Some(LaterWindow { at, status }));
            }
        }
        Ok(None)
    }

    /// The window `resource` most likely counts in: the default plan's (most
    /// accounts are on it), else month (a plan that does not list it).
    fn likely_window(&self, resource: &ResourceName) -> Window {
        self.catalog
            .limit(&self.catalog.default_plan, resource)
            .map_or(Window::Month, |l| l.window)
    }

    /// Checks and records `entry` in one atomic step; a key used before
    /// returns its first outcome and records nothing. `now` is when the
    /// caller is answered: a refusal's `retry_after` counts from it.
    pub async fn consume(
        &self,
        entry: &NewEntry,
        rates: &RateLimits,
        now: DateTime<Utc>,
    ) -> Result<ConsumeOutcome, ConsumeError> {
        let at = entry.occurred_at;
        if let Some(rules) = self.rules_without_rate(&entry.resource, at)
            && let Some(decided) = self.store.consume_decided(entry, rules, now).await?
        {
            return self.decided(entry, decided, now).await;
        }
        let decider = Decider {
            catalog: self.catalog,
            entry,
            rates,
            now,
        };
        match self.store.consume(entry, &decider).await? {
            ConsumeResult::Recorded { entry_id, response } => Ok(recorded(entry, entry_id, &response, false)?),
            replayed @ ConsumeResult::Replayed { .. } => self.replayed(entry, replayed).await,
            ConsumeResult::Rejected { reason } => {
                let rejected: Rejected = serde_json::from_str(&reason).map_err(|e| {
                    StoreError::Unexpected(format!("a consume was refused for a reason not understood: {e}"))
                })?;
                Ok(match rejected {
                    Rejected::LargerThanRate { per_minute } => {
                        return Err(ConsumeError::LargerThanRate {
                            amount: entry.amount.to_string(),
                            resource: entry.resource.to_string(),
                            per_minute,
                        });
                    }
                    Rejected::RateLimited {
                        retry_after,
                        per_minute,
                    } => ConsumeOutcome::RateLimited {
                        retry_after,
                        per_minute,
                    },
                    Rejected::QuotaExceeded {
                        status,
                        retry_after,
                        in_force_now,
                    } => ConsumeOutcome::QuotaExceeded {
                        status,
                        retry_after,
                        in_force_now,
                    },
                    Rejected::PastSixtyFourBits { status } => return Err(past_64_bits(entry, &status)),
                })
            }
        }
    }
}

/// Why the multi-statement consume refused, as [`Decider::decide`] tells
/// the store (and the store tells [`Quotas::consume`] back).
#[derive(Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
enum Rejected {
    LargerThanRate {
        per_minute: u32,
    },
    RateLimited {
        retry_after: u64,
        per_minute: u32,
    },
    QuotaExceeded {
        status: QuotaStatus,
        retry_after: Option<u64>,
        in_force_now: bool,
    },
    PastSixtyFourBits {
        status: QuotaStatus,
    },
}

/// The refusal of a consume whose amount would take `status`'s window past
/// 64 bits of minor units.
fn past_64_bits(entry: &NewEntry, status: &QuotaStatus) -> ConsumeError {
    ConsumeError::PastSixtyFourBits {
        amount: entry.amount.to_string(),
        resource: entry.resource.to_string(),
        account: entry.account.to_string(),
        window: status.window.as_str(),
        used: status.used.clone(),
    }
}

/// Whether a limit refuses what passes it: only a hard one with a number.
fn caps(limit: &EffectiveLimit) -> bool {
    limit.limit.is_some() && limit.enforcement == Enforcement::Hard
}

impl Rejected {
    fn reason(&self) -> String {
        serde_json::to_string(self).expect("serialisable")
    }
}

/// Decides a consume under the store's lock, from the limits and `used` read
/// there (the multi-statement path: SQLite, or a resource with a rate).
struct Decider<'a> {
    catalog: &'a Catalog,
    entry: &'a NewEntry,
    rates: &'a RateLimits,
    /// When the caller is answered (for `retry_after`).
    now: DateTime<Utc>,
}

/// A limit a consume is held to, with the period it counts over.
struct Judged {
    limit: EffectiveLimit,
    period: Period,
    /// The limit in force now, not at the consume's `occurred_at`.
    in_force_now: bool,
}

impl Decider<'_> {
    fn limit_at(&self, plans: &[PlanAssignment], overrides: &[OverrideChange], at: DateTime<Utc>) -> EffectiveLimit {
        effective_limit(
            self.catalog,
            plan_at(self.catalog, plans, at),
            &overrides_as_of(overrides, at),
            &self.entry.resource,
            at,
        )
    }

    /// The limits the consume is held to: the one in force at its
    /// `occurred_at` (that instant's limits, as for a check), and, for a
    /// consume dated by its caller, also the one in force now when the
    /// window it counts in now holds that instant. Without the second a
    /// consume dated before a downgrade or a lowered override, in the same
    /// window, would still record up to the earlier, higher limit, leaving
    /// the window's `used` past the limit in force.
    fn judged(&self, plans: &[PlanAssignment], overrides: &[OverrideChange]) -> Vec<Judged> {
        let at = self.entry.occurred_at;
        let limit = self.limit_at(plans, overrides, at);
        let period = Period::containing(limit.window, at);
        let mut judged = vec![Judged {
            limit,
            period,
            in_force_now: false,
        }];
        if self.entry.occurred_at_given {
            let limit = self.limit_at(plans, overrides, self.now);
            let period = Period::containing(limit.window, self.now);
            if period.contains(at) && (&limit, &period) != (&judged[0].limit, &judged[0].period) {
                judged.push(Judged {
                    limit,
                    period,
                    in_force_now: true,
                });
            }
        }
        judged
    }

    /// The per-minute rate of the resource under the plan in force when the
    /// request arrives. A rate limits requests as they come: the instant a
    /// consume is dated (up to the late-arrival horizon back) must not pick
    /// an earlier plan's rate, or none, for a request made now.
    fn rate_per_minute(&self, plans: &[PlanAssignment]) -> Option<u32> {
        let plan = plan_at(self.catalog, plans, self.now);
        self.catalog
            .limit(plan, &self.entry.resource)
            .and_then(|l| l.rate_per_minute)
    }
}

/// The distinct periods of `judged`, in order: what `used` is read for.
fn periods_of(judged: &[Judged]) -> Vec<Period> {
    let mut periods: Vec<Period> = Vec::with_capacity(judged.len());
    for j in judged {
        if !periods.contains(&j.period) {
            periods.push(j.period);
        }
    }
    periods
}

impl ConsumeDecider for Decider<'_> {
    fn periods(&self, plans: &[PlanAssignment], overrides: &[OverrideChange]) -> Vec<Period> {
        periods_of(&self.judged(plans, overrides))
    }

    fn decide(
        &self,
        plans: &[PlanAssignment],
        overrides: &[OverrideChange],
        used_minor: &[i64],
    ) -> Result<String, String> {
        let entry = self.entry;
        let judged = self.judged(plans, overrides);
        let periods = periods_of(&judged);
        let used_in = |period: &Period| -> Result<Amount, String> {
            periods
                .iter()
                .position(|p| p == period)
                .and_then(|i| used_minor.get(i))
                .map(|minor| Amount::from_minor(*minor, entry.amount.decimals()))
                .ok_or_else(|| format!("no `used` was read for the period {period:?}"))
        };
        // Judged here, after the store found the key unused: a retry of a
        // consume recorded under a plan without this rate replays its first
        // outcome instead of failing on today's rate.
        let cells = self
            .rate_per_minute(plans)
            .map(|per_minute| (per_minute, rate_cells(per_minute, entry.amount)));
        if let Some((per_minute, None)) = cells {
            return Err(Rejected::LargerThanRate { per_minute }.reason());
        }
        let mut afters = Vec::with_capacity(judged.len());
        for held in &judged {
            let used = used_in(&held.period)?;
            let exceeded = || {
                let status = QuotaStatus::new(&entry.account, &entry.resource, &held.limit, &held.period, used, false);
                Rejected::QuotaExceeded {
                    status,
                    retry_after: retry_after(&held.limit, entry.amount, &held.period, self.now, held.in_force_now),
                    in_force_now: held.in_force_now,
                }
                .reason()
            };
            let after = match used.checked_add(entry.amount) {
                Ok(after) => after,
                // Past 64 bits a hard limit is passed too, and that is the reason given.
                Err(_) if caps(&held.limit) => return Err(exceeded()),
                Err(_) => {
                    let status =
                        QuotaStatus::new(&entry.account, &entry.resource, &held.limit, &held.period, used, false);
                    return Err(Rejected::PastSixtyFourBits { status }.reason());
                }
            };
            if !allows(&held.limit, used, entry.amount) {
                return Err(exceeded());
            }
            afters.push(after);
        }
        let after = *afters.first().ok_or("a consume was held to no limit")?;
        // The answer is the limit at the consume's instant, as a check of it
        // says; the warnings are also the limit in force now's.
        let Judged { limit, period, .. } = &judged[0];
        let status = QuotaStatus::new(&entry.account, &entry.resource, limit, period, after, true);
        let in_force_now = judged
            .get(1)
            .zip(afters.get(1))
            .map(|(now, after)| (&now.limit, *after));
        let warnings = consume_warnings(&entry.resource, (limit, after), in_force_now);
        Ok(serde_json::json!({ "status": status, "warnings": warnings }).to_string())
    }

    fn charge_rate(&self, plans: &[PlanAssignment]) -> Result<(), String> {
        let Some(per_minute) = self.rate_per_minute(plans) else {
            return Ok(());
        };
        let Some((budget, cells)) = rate_cells(per_minute, self.entry.amount) else {
            // `decide` refused it already; said again rather than let through.
            return Err(Rejected::LargerThanRate { per_minute }.reason());
        };
        let retry_after =
            match self
                .rates
                .check(budget, self.entry.account.as_str(), self.entry.resource.as_str(), cells)
            {
                RateDecision::Allowed => return Ok(()),
                RateDecision::RetryAfter(wait) => wait.as_secs_f64().ceil().max(1.0) as u64,
                RateDecision::NeverFits => 60,
            };
        Err(Rejected::RateLimited {
            retry_after,
            per_minute,
        }
        .reason())
    }
}

impl Quotas<'_> {
    /// The catalog's rules for `resource` when no plan gives it a per-minute
    /// rate (None otherwise: rates are counted in process, under the lock of
    /// the multi-statement path).
    fn rules_without_rate(&self, resource: &ResourceName, at: DateTime<Utc>) -> Option<ConsumeRules> {
        let mut plans = Vec::new();
        for (name, plan) in &self.catalog.plans {
            let Some(limit) = plan.limits.get(resource) else {
                continue;
            };
            if limit.rate_per_minute.is_some() {
                return None;
            }
            plans.push(PlanRule {
                plan: name.clone(),
                limit: limit.limit.map(Amount::minor),
                enforcement: limit.enforcement,
                window: limit.window,
                overage_price: limit.overage_price.map(|p| p.to_string()),
            });
        }
        Some(ConsumeRules {
            default_plan: self.catalog.default_plan.clone(),
            plans,
            likely_period: Period::containing(self.likely_window(resource), at),
        })
    }

    /// The outcome of a consume the database decided.
    async fn decided(
        &self,
        entry: &NewEntry,
        decided: DecidedConsume,
        now: DateTime<Utc>,
    ) -> Result<ConsumeOutcome, ConsumeError> {
        match decided {
            DecidedConsume::Recorded { entry_id, context } => Ok(recorded(entry, entry_id, &context, false)?),
            DecidedConsume::Replayed(replayed) => self.replayed(entry, replayed).await,
            DecidedConsume::Rejected {
                used,
                context,
                in_force_now,
            } => {
                let stored = StoredLimit::parse(&context, None)?;
                let (limit, period) = stored.limit(entry.amount.decimals())?;
                let used = Amount::from_minor(used, entry.amount.decimals());
                let status = QuotaStatus::new(&entry.account, &entry.resource, &limit, &period, used, false);
                // The database refuses only past a hard limit or past BIGINT.
                if !caps(&limit) {
                    return Err(past_64_bits(entry, &status));
                }
                Ok(ConsumeOutcome::QuotaExceeded {
                    status,
                    retry_after: retry_after(&limit, entry.amount, &period, now, in_force_now),
                    in_force_now,
                })
            }
        }
    }

    /// The outcome of a consume whose key was used before.
    async fn replayed(&self, entry: &NewEntry, result: ConsumeResult) -> Result<ConsumeOutcome, ConsumeError> {
        match result {
            ConsumeResult::Replayed {
                entry_id,
                response: Some(response),
                ..
            } => Ok(recorded(entry, entry_id, &response, true)?),
            ConsumeResult::Replayed {
                entry_id,
                occurred_at,
                response: None,
            } => {
                // Posted through /v1/entries, not consume: answer with the
                // state now of the window holding that entry (a retry without
                // `occurred_at` matches an entry of any day), and the
                // warnings it deserves.
                let (status, limit, used) = self
                    .check_with_limit(&entry.account, &entry.resource, entry.amount, occurred_at)
                    .await?;
                Ok(ConsumeOutcome::Recorded {
                    status: QuotaStatus {
                        allowed: true,
                        ..status
                    },
                    entry_id,
                    warnings: warnings_for(&entry.resource, &limit, used),
                    replayed: true,
                })
            }
            other => Err(ConsumeError::Store(StoreError::Unexpected(format!(
                "a replay was expected, the store answered {other:?}"
            )))),
        }
    }
}

/// A per-minute rate and an amount in the limiter's cells: (the budget, the
/// amount), or None when the amount exceeds the whole budget. A cell is the
/// resource's minor unit (0.01 of a 2-decimal resource), so fractional
/// amounts count exactly; only when `per_minute` minor units would not fit a
/// u32 is a cell coarser (a power of ten), and the amount rounded up to it.
fn rate_cells(per_minute: u32, amount: Amount) -> Option<(u32, u32)> {
    let decimals = amount.decimals();
    let mut digits = decimals;
    while digits > 0 && u64::from(per_minute) * 10_u64.pow(digits) > u64::from(u32::MAX) {
        digits -= 1;
    }
    let budget = u64::from(per_minute) * 10_u64.pow(digits);
    let per_cell = 10_i128.pow(decimals - digits);
    let minor = i128::from(amount.minor()).max(0);
    let cells = (minor + per_cell - 1) / per_cell;
    if cells > i128::from(budget) {
        return None;
    }
    Some((u32::try_from(budget).ok()?, u32::try_from(cells).ok()?))
}

/// The amount a check asks about, from its text (`POST /v1/quota/check`,
/// `tally check`): exact, with `resource`'s precision, and strictly
/// positive; the error says what to send instead.
pub fn check_amount(text: &str, resource: &ResourceName, decimals: u32) -> Result<Amount, String> {
    let amount = Amount::parse(text, decimals).map_err(|e| match e {
        // The ledger's own words for 0 ("leave out an entry…") do not fit a check.
        AmountError::Zero => "amount 0 asks about no usage: a check's amount is the positive amount about to be \
                              used; leave amount out to check one unit (the default)"
            .to_owned(),
        e => e.of_resource(resource.as_str(), decimals),
    })?;
    if amount.minor() < 0 {
        return Err(format!(
            "amount {amount} must be positive: a check asks about usage about to happen; a correction or a \
             deletion is a negative entry (POST /v1/entries, or tally post)"
        ));
    }
    Ok(amount)
}

/// Whole seconds, rounded up, from `now` to the end of `period`: the
/// wait before a consume made then lands in a fresh window. None for a total
/// (it never resets), for an amount over the whole limit (no fresh window
/// takes it), and for a window that has already closed (a backdated consume
/// stays in its window however long one waits). Counted from now even for an
/// `occurred_at` a little ahead: the window still ends at `period_end`.
/// A limit `in_force_now` (one holding a dated consume besides the limit at
/// its date) holds it only while its window is the current one: when that
/// window ends it lets go, whatever the amount, and the limit at its date,
/// which took it, alone decides.
fn retry_after(
    limit: &EffectiveLimit,
    amount: Amount,
    period: &Period,
    now: DateTime<Utc>,
    in_force_now: bool,
) -> Option<u64> {
    if !in_force_now && limit.limit.is_some_and(|whole| amount.minor() > whole.minor()) {
        return None;
    }
    whole_seconds_until(now, period.ends_at()?)
}

/// Whole seconds from `now` to `at`, rounded up (a `Retry-After`); None
/// when `at` is not after `now`.
pub fn whole_seconds_until(now: DateTime<Utc>, at: DateTime<Utc>) -> Option<u64> {
    let micros = (at - now).num_microseconds().unwrap_or(i64::MAX);
    u64::try_from(micros)
        .ok()
        .filter(|m| *m > 0)
        .map(|m| m.div_ceil(1_000_000))
}

/// The outcome the database stores for a consume it decided
/// (`tally_consume_group`, as migration 0020 last defines it): the limit it resolved, in minor units,
/// and `used_after`. The check fields and warnings are rebuilt from it, the
/// same way for the first answer and for every replay.
#[derive(Debug, Deserialize)]
struct StoredLimit {
    plan: String,
    window: Window,
    limit: Option<i64>,
    enforcement: Enforcement,
    overage_price: Option<String>,
    period_start: Option<chrono::NaiveDate>,
    period_end: Option<chrono::NaiveDate>,
    used_after: Option<i64>,
    /// For a dated consume also held to the limit in force when it was
    /// answered (since migration 0017): that limit, in the same window and period.
    now: Option<Box<StoredLimit>>,
}

impl StoredLimit {
    /// Reads it back; `entry_id` is the consume's entry, None for a refused
    /// consume (it recorded nothing).
    fn parse(text: &str, entry_id: Option<i64>) -> Result<Self, StoreError> {
        serde_json::from_str(text).map_err(|e| {
            StoreError::Unexpected(match entry_id {
                Some(id) => format!("the stored outcome of consume entry {id} cannot be read back: {e}"),
                None => format!("the outcome the database gave a refused consume cannot be read: {e}"),
            })
        })
    }

    fn limit(&self, decimals: u32) -> Result<(EffectiveLimit, Period), StoreError> {
        let overage_price = match &self.overage_price {
            None => None,
            Some(text) => Some(
                text.parse::<Decimal>()
                    .map_err(|e| StoreError::Unexpected(format!("stored overage price {text:?}: {e}")))?,
            ),
        };
        let limit = EffectiveLimit {
            plan: self.plan.clone(),
            window: self.window,
            limit: self.limit.map(|minor| Amount::from_minor(minor, decimals)),
            enforcement: self.enforcement,
            overage_price,
        };
        let period = Period {
            window: self.window,
            start: self.period_start,
            end: self.period_end,
        };
        Ok((limit, period))
    }
}

/// One resource's line in an account's usage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRow {
    /// Resource.
    pub resource: String,
    /// The window.
    pub window: Window,
    /// Used in the period.
    pub used: String,
    /// Null: unlimited.
    pub limit: Option<String>,
    /// Null: unlimited.
    pub remaining: Option<String>,
    /// used / limit × 100, 2 decimals (null when unlimited or the limit is 0).
    pub percent: Option<String>,
    /// ok, warning or exceeded.
    pub status: UsageStatus,
    /// Hard or soft.
    pub enforcement: Enforcement,
    /// Start of the period (null for total).
    pub period_start: Option<DateTime<Utc>>,
    /// End of the period (null for total).
    pub period_end: Option<DateTime<Utc>>,
}

/// Where an account stands on every resource its plan limits or it has used.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageReport {
    /// Account.
    pub account: String,
    /// The plan in force at the instant asked about.
    pub plan: String,
    /// One row per resource.
    pub resources: Vec<UsageRow>,
    /// At or past 80 % and 100 % of limits.
    pub warnings: Vec<Warning>,
}

impl Quotas<'_> {
    /// The account's usage at `at`.
    pub async fn usage(&self, account: &AccountId, at: DateTime<Utc>) -> Result<UsageReport, StoreError> {
        let (history, changes) = self.store.plans_and_override_changes(account).await?;
        let plan = plan_at(self.catalog, &history, at);
        let overrides = overrides_as_of(&changes, at);
        let mut names: Vec<String> = self
            .catalog
            .plans
            .get(plan)
            .map(|p| p.limits.keys().map(|r| r.to_string()).collect())
            .unwrap_or_default();
        names.extend(
            overrides
                .iter()
                .filter(|o| o.active_at(at))
                .map(|o| o.resource.to_string()),
        );
        names.extend(self.store.used_resources(account).await?);
        names.sort();
        names.dedup();
        let mut report = UsageReport {
            account: account.to_string(),
            plan: plan.to_owned(),
            resources: Vec::new(),
            warnings: Vec::new(),
        };
        for name in names {
            let Ok((resource, spec)) = self.catalog.resource(&name) else {
                continue;
            };
            let limit = effective_limit(self.catalog, plan, &overrides, resource, at);
            let period = Period::containing(limit.window, at);
            let used = Amount::from_minor(self.store.used(account, resource, &period).await?, spec.decimals);
            let status = QuotaStatus::new(account, resource, &limit, &period, used, true);
            report.warnings.extend(warnings_for(resource, &limit, used));
            report.resources.push(UsageRow {
                resource: name,
                window: limit.window,
                used: status.used,
                limit: status.limit,
                remaining: status.remaining,
                percent: limit.limit.and_then(|cap| percent(used, cap)).map(|p| p.to_string()),
                status: status.status,
                enforcement: limit.enforcement,
                period_start: status.period_start,
                period_end: status.period_end,
            });
        }
        Ok(report)
    }
}

fn allows(limit: &EffectiveLimit, used: Amount, amount: Amount) -> bool {
    // Past 64 bits of minor units nothing can record it, limit or none.
    let Ok(after) = used.checked_add(amount) else {
        return false;
    };
    match (limit.limit, limit.enforcement) {
        (None, _) | (_, Enforcement::Soft) => true,
        (Some(cap), Enforcement::Hard) => after.minor() <= cap.minor(),
    }
}

/// A recorded consume from its stored outcome: the full check fields and
/// warnings (the multi-statement path), or the resolved limit and used_after
/// (the database-decided path, see [`StoredLimit`]).
fn recorded(entry: &NewEntry, entry_id: i64, response: &str, replayed: bool) -> Result<ConsumeOutcome, StoreError> {
    #[derive(Deserialize)]
    struct Stored {
        status: QuotaStatus,
        warnings: Vec<Warning>,
    }
    if let Ok(stored) = serde_json::from_str::<Stored>(response) {
        return Ok(ConsumeOutcome::Recorded {
            status: stored.status,
            entry_id,
            warnings: stored.warnings,
            replayed,
        });
    }
    let stored = StoredLimit::parse(response, Some(entry_id))?;
    let decimals = entry.amount.decimals();
    let (limit, period) = stored.limit(decimals)?;
    let after = Amount::from_minor(
        stored.used_after.ok_or_else(|| {
            StoreError::Unexpected(format!(
                "the stored outcome of consume entry {entry_id} has no used_after"
            ))
        })?,
        decimals,
    );
    let in_force_now = stored.now.as_ref().map(|now| now.limit(decimals)).transpose()?;
    Ok(ConsumeOutcome::Recorded {
        status: QuotaStatus::new(&entry.account, &entry.resource, &limit, &period, after, true),
        entry_id,
        warnings: consume_warnings(
            &entry.resource,
            (&limit, after),
            in_force_now.as_ref().map(|(now, _)| (now, after)),
        ),
        replayed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_under_a_limit_is_never_negative_and_never_wraps() {
        assert_eq!(room_under(100, 30), 70);
        assert_eq!(room_under(100, 130), 0);
        // A balance near i64::MIN once wrapped to a negative room, shown as 0.
        assert_eq!(room_under(100, i64::MIN + 1), i64::MAX);
        assert_eq!(room_under(0, -5), 5);
    }

    #[test]
    fn percent_never_reaches_a_threshold_before_the_status_does() {
        let amount = |minor| Amount::from_minor(minor, 0);
        let shown = |used, limit| percent(amount(used), amount(limit)).map(|p| p.to_string());
        assert_eq!(shown(49_999, 50_000).as_deref(), Some("99.99"));
        assert_eq!(status_of(amount(49_999), Some(amount(50_000))), UsageStatus::Warning);
        assert_eq!(shown(39_998, 50_000).as_deref(), Some("79.99"));
        assert_eq!(status_of(amount(39_998), Some(amount(50_000))), UsageStatus::Ok);
        assert_eq!(shown(40, 50).as_deref(), Some("80"));
        assert_eq!(shown(2, 3).as_deref(), Some("66.66"));
        assert_eq!(shown(-1, 3).as_deref(), Some("-33.33"));
        assert_eq!(shown(5, 0), None);
    }

    #[test]
    fn rate_cells_count_minor_units_and_coarsen_only_past_32_bits() {
        let amount = |text: &str, decimals| Amount::parse(text, decimals).unwrap();
        assert_eq!(rate_cells(100, amount("3", 0)), Some((100, 3)));
        assert_eq!(rate_cells(100, amount("101", 0)), None);
        assert_eq!(rate_cells(2, amount("0.5", 2)), Some((200, 50)));
        assert_eq!(rate_cells(2, amount("2.01", 2)), None);
        // 100 a minute in nanos would not fit 32 bits: cells of 10^-7, rounded up.
        assert_eq!(rate_cells(100, amount("0.000000001", 9)), Some((1_000_000_000, 1)));
        assert_eq!(rate_cells(100, amount("100", 9)), Some((1_000_000_000, 1_000_000_000)));
        assert_eq!(rate_cells(100, amount("100.000000001", 9)), None);
    }
}
