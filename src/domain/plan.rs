//! An account's plan history, per-account overrides, and the period a limit
//! counts over at a given instant.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

use super::catalog::{Enforcement, Window};
use super::period::{Granularity, month_start, start_of};
use super::{Amount, AmountError, ResourceName};

/// One assignment of a plan to an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanAssignment {
    /// The plan's name.
    pub plan: String,
    /// From when it applies.
    pub effective_at: DateTime<Utc>,
    /// When it was assigned.
    pub created_at: DateTime<Utc>,
}

impl PlanAssignment {
    /// Whether this is how Tally kept an account on a former default plan
    /// when the catalog's `default_plan` changed (effective
    /// [`from_the_start`]): the account is on that plan as it was on the
    /// default, so it is billed as one on the default is, for the months it
    /// has usage, not as an account someone put on a plan.
    pub fn keeps_a_former_default(&self) -> bool {
        self.effective_at == from_the_start()
    }
}

/// What opening a database did about a change of the catalog's
/// `default_plan` since the default recorded there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultPlanChange {
    /// The default recorded before; None for the first record.
    pub from: Option<String>,
    /// The catalog's default, recorded now.
    pub to: String,
    /// How many accounts already known were assigned `from` from the
    /// start, to stay on it; `None` when `from` is no longer in the catalog,
    /// so that they could not stay on it and now have `to`, their past
    /// included.
    pub kept: Option<u64>,
}

/// When the accounts known at a change of the default plan are assigned the
/// previous default: the earliest instant Tally takes (0001-01-01), so that
/// no instant of theirs is left on the new default.
pub fn from_the_start() -> DateTime<Utc> {
    chrono::NaiveDate::from_ymd_opt(1, 1, 1)
        .and_then(|day| day.and_hms_opt(0, 0, 0))
        .expect("0001-01-01 is a date")
        .and_utc()
}

/// A per-account limit that beats the plan's until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Override {
    /// The resource it limits.
    pub resource: ResourceName,
    /// `None`: unlimited.
    pub limit: Option<Amount>,
    /// `None`: the plan's enforcement (hard when the plan does not limit the resource).
    pub enforcement: Option<Enforcement>,
    /// `None`: the plan's window (month when the plan does not limit the resource).
    pub window: Option<Window>,
    /// `None`: until removed.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was last set.
    pub updated_at: DateTime<Utc>,
}

/// Why a text is not a limit. Displayed as an override's API and CLI say
/// it; the catalog words it for its file (no null there).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Not a decimal in the resource's precision.
    #[error("limit: {0} (or null / \"unlimited\" for no limit)")]
    Invalid(AmountError),
    /// Below zero.
    #[error("limit must not be negative (null / \"unlimited\" means no limit)")]
    Negative,
}

/// Parses a limit: a non-negative decimal in the resource's precision, or
/// `unlimited` (None).
pub fn parse_limit(text: &str, decimals: u32) -> Result<Option<Amount>, LimitError> {
    if text == "unlimited" {
        return Ok(None);
    }
    let amount = super::amount::parse_decimal(text)
        .and_then(|d| Amount::from_decimal(d, decimals, text))
        .map_err(LimitError::Invalid)?;
    if amount.minor() < 0 {
        return Err(LimitError::Negative);
    }
    Ok(Some(amount))
}

impl Override {
    /// Whether it applies at `at`, if it was set by then.
    pub fn active_at(&self, at: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|expires| at < expires)
    }

    /// An override set at `set_at` is in force from then until `expires_at`:
    /// an expiry not after `set_at` would make one that never applies, which
    /// is a mistake (a past date, a wrong offset), not a way to remove one;
    /// `remove` says what is (the API's `DELETE`, or the CLI's command).
    pub fn check_expiry(expires_at: Option<DateTime<Utc>>, set_at: DateTime<Utc>, remove: &str) -> Result<(), String> {
        match expires_at {
            Some(expires) if expires <= set_at => Err(format!(
                "expires_at {} is not after now ({}): an override is in force from when it is set until it \
                 expires, so this one would never apply; to remove an override, {remove}",
                expires.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                set_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )),
            _ => Ok(()),
        }
    }
}

/// One change to an account's override of a resource, as its history keeps
/// it: set to `value` (whose `updated_at` is when), or removed then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverrideChange {
    /// The override as set (for a removal, the resource and the time).
    pub value: Override,
    /// Whether the change removed the override.
    pub removed: bool,
}

/// The overrides set as of `at` by an account's `history` (its changes in
/// the order they were made): per resource the latest change made at or
/// before `at`, unless it was a removal. Whether each one still applies at
/// `at` is then [`Override::active_at`]'s.
pub fn overrides_as_of(history: &[OverrideChange], at: DateTime<Utc>) -> Vec<Override> {
    let mut latest: Vec<&OverrideChange> = Vec::new();
    for change in history.iter().filter(|c| c.value.updated_at <= at) {
        match latest.iter_mut().find(|c| c.value.resource == change.value.resource) {
            Some(slot) => *slot = change,
            None => latest.push(change),
        }
    }
    latest
        .into_iter()
        .filter(|c| !c.removed)
        .map(|c| c.value.clone())
        .collect()
}

/// The period a window covers at an instant: [start, end) in UTC dates, or
/// all time for `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    /// The window.
    pub window: Window,
    /// First day (None for total).
    pub start: Option<NaiveDate>,
    /// Day after the last (None for total).
    pub end: Option<NaiveDate>,
}

impl Period {
    /// The period of `window` containing `at`.
    pub fn containing(window: Window, at: DateTime<Utc>) -> Self {
        let day = at.date_naive();
        let (start, end) = match window {
            Window::Day => (Some(day), Some(Granularity::Day.next(day))),
            Window::Month => {
                let first = month_start(day);
                (Some(first), Some(Granularity::Month.next(first)))
            }
            Window::Total => (None, None),
        };
        Self { window, start, end }
    }

    /// The instant the period starts.
    pub fn starts_at(&self) -> Option<DateTime<Utc>> {
        self.start.map(start_of)
    }

    /// The instant the period ends (exclusive).
    pub fn ends_at(&self) -> Option<DateTime<Utc>> {
        self.end.map(start_of)
    }

    /// Whether `at` falls in the period.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        self.starts_at().is_none_or(|start| start <= at) && self.ends_at().is_none_or(|end| at < end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(resource: &str, limit: i64, at: &str, removed: bool) -> OverrideChange {
        OverrideChange {
            value: Override {
                resource: ResourceName::from_stored(resource.to_owned()),
                limit: Some(Amount::from_minor(limit, 0)),
                enforcement: None,
                window: None,
                expires_at: None,
                updated_at: at.parse().expect("an instant"),
            },
            removed,
        }
    }

    #[test]
    fn overrides_as_of_take_each_resources_latest_change_by_then_and_drop_removals() {
        let history = [
            change("a", 1, "2026-09-01T00:00:00Z", false),
            change("a", 2, "2026-09-10T00:00:00Z", false),
            change("b", 3, "2026-09-05T00:00:00Z", false),
            change("b", 0, "2026-09-08T00:00:00Z", true),
        ];
        let limits = |at: &str| -> Vec<(String, i64)> {
            overrides_as_of(&history, at.parse().expect("an instant"))
                .into_iter()
                .map(|o| (o.resource.to_string(), o.limit.map_or(-1, Amount::minor)))
                .collect()
        };
        assert_eq!(limits("2026-08-31T23:59:59Z"), vec![]);
        assert_eq!(limits("2026-09-06T00:00:00Z"), vec![("a".into(), 1), ("b".into(), 3)]);
        assert_eq!(limits("2026-09-08T00:00:00Z"), vec![("a".into(), 1)]);
        assert_eq!(limits("2026-09-10T00:00:00Z"), vec![("a".into(), 2)]);
    }
}
