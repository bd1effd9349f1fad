//! Parsing of path and query parameters, each failure a located 422.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};

use super::error::ApiError;
use crate::domain::entry::{parse_bound, parse_instant_or_date, parse_range_bound};
use crate::domain::{AccountId, Catalog, ResourceName};

/// An account id from the path.
pub fn account(raw: &str) -> Result<AccountId, ApiError> {
    AccountId::parse(raw).map_err(|m| ApiError::invalid("account", m))
}

/// A declared resource.
pub fn resource(catalog: &Catalog, raw: &str) -> Result<ResourceName, ApiError> {
    catalog.resource(raw).map(|(name, _)| name.clone()).map_err(|e| {
        ApiError::from_field_errors(vec![crate::domain::FieldError {
            index: 0,
            field: "resource",
            code: "unknown_resource",
            message: e.to_string(),
        }])
    })
}

/// A resource a read of the ledger names: declared, or dropped from the
/// catalog with entries still in the ledger (of `account`, when given); else
/// the 422 of [`resource`].
pub async fn readable_resource(
    state: &super::AppState,
    account: Option<&AccountId>,
    raw: &str,
) -> Result<ResourceName, ApiError> {
    match crate::usage::readable_resource(state.store.as_ref(), &state.catalog, account, raw).await? {
        Some(name) => Ok(name),
        None => resource(&state.catalog, raw),
    }
}

/// An instant: RFC 3339, or a bare date meaning its UTC midnight.
pub fn instant(field: &'static str, raw: &str) -> Result<DateTime<Utc>, ApiError> {
    parse_instant_or_date(raw).map_err(|m| ApiError::invalid(field, format!("{field}: {m}")))
}

/// A query parameter that bounds a read or names an instant no period is
/// read at ([`parse_bound`]): as [`instant`], December 9999 included.
pub fn bound(field: &'static str, raw: &str) -> Result<DateTime<Utc>, ApiError> {
    parse_bound(raw).map_err(|m| ApiError::invalid(field, format!("{field}: {m}")))
}

/// A `from` or `to` query parameter bounding a range of stored instants
/// ([`parse_range_bound`]: a finer-than-microsecond bound is rounded up).
pub fn range_bound(field: &'static str, raw: &str) -> Result<DateTime<Utc>, ApiError> {
    parse_range_bound(raw).map_err(|m| ApiError::invalid(field, format!("{field}: {m}")))
}

/// The `at` query parameter (see [`instant`]): the instant a read is
/// about, `now` when absent.
pub fn at(query: &HashMap<String, String>, now: DateTime<Utc>) -> Result<DateTime<Utc>, ApiError> {
    query.get("at").map_or(Ok(now), |raw| instant("at", raw))
}

/// 422 for a query parameter this endpoint does not take (a typo would
/// otherwise silently widen the result).
pub fn reject_unknown(query: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    let Some(unknown) = query.keys().find(|k| !known.contains(&k.as_str())) else {
        return Ok(());
    };
    let takes = if known.is_empty() {
        "no query parameters".to_owned()
    } else {
        known.join(", ")
    };
    Err(ApiError::invalid(
        "query",
        format!("unknown query parameter {unknown:?}; this endpoint takes {takes}"),
    ))
}

/// A calendar date (`YYYY-MM-DD`), or a month (`YYYY-MM`) meaning its first day.
pub fn date(field: &'static str, raw: &str) -> Result<NaiveDate, ApiError> {
    crate::domain::period::parse_date(raw).map_err(|m| ApiError::invalid(field, format!("{field}: {m}")))
}

/// A month, `YYYY-MM`.
pub fn month(field: &'static str, raw: &str) -> Result<NaiveDate, ApiError> {
    crate::domain::period::parse_month(raw).map_err(|m| ApiError::invalid(field, format!("{field}: {m}")))
}
