//! An account's plan history, per-account overrides, and the period a limit
//! counts over at a given instant.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

use super::catalog::{Enforcement, Window};
use super::period::{Granularity, month_start, start_of};
use super::{Amount, ResourceName};

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

/// Parses a limit: a non-negative decimal in the resource's precision, or
/// `unlimited` (None).
pub fn parse_limit(text: &str, decimals: u32) -> Result<Option<Amount>, String> {
    if text == "unlimited" {
        return Ok(None);
    }
    let amount = super::amount::parse_decimal(text)
        .and_then(|d| Amount::from_decimal(d, decimals, text))
        .map_err(|e| format!("limit: {e} (or null / \"unlimited\" for no limit)"))?;
    if amount.minor() < 0 {
        return Err("limit must not be negative (null / \"unlimited\" means no limit)".into());
    }
    Ok(Some(amount))
}

impl Override {
    /// Whether it applies at `at`.
    pub fn active_at(&self, at: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|expires| at < expires)
    }
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
}
