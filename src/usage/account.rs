//! The account view: the plan in force, the plan history and the overrides,
//! as `GET /v1/accounts/{account}` and `tally accounts show` give it.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::quota::plan_at;
use crate::domain::plan::{Override, OverrideChange, PlanAssignment, overrides_as_of};
use crate::domain::{AccountId, Catalog, ResourceName};
use crate::store::{Store, StoreError};

/// An account's plan in force, plan history and overrides.
#[derive(Debug, Serialize)]
pub struct AccountView {
    /// The account.
    pub account: AccountId,
    /// The plan in force now.
    pub plan: String,
    /// Every assignment, as made.
    pub plan_history: Vec<PlanAssignment>,
    /// The overrides as last set.
    pub overrides: Vec<OverrideView>,
    /// Every change to the overrides, in the order made: checks and usage
    /// at a past instant follow the override in force then, which may since
    /// have been replaced or removed.
    pub override_history: Vec<OverrideChangeView>,
}

/// One change to an account's overrides: `{"change": "set", …the override}`
/// or `{"change": "removed", "resource", "updated_at"}`.
#[derive(Debug, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum OverrideChangeView {
    /// An override set (or replaced) from its `updated_at`.
    Set(Override),
    /// The override of `resource` removed at `updated_at`.
    Removed {
        /// The resource.
        resource: ResourceName,
        /// When.
        updated_at: DateTime<Utc>,
    },
}

impl From<OverrideChange> for OverrideChangeView {
    fn from(change: OverrideChange) -> Self {
        if change.removed {
            Self::Removed {
                resource: change.value.resource,
                updated_at: change.value.updated_at,
            }
        } else {
            Self::Set(change.value)
        }
    }
}

/// An override as last set, and whether it has expired: an expired override
/// stays listed until it is changed or removed, but no longer applies, which
/// a reader could not tell without comparing `expires_at` with the clock.
#[derive(Debug, Serialize)]
pub struct OverrideView {
    /// The override.
    #[serde(flatten)]
    pub set: Override,
    /// `expires_at` is at or before now.
    pub expired: bool,
}

/// The account as it stands at `now`.
pub async fn account_view(
    store: &dyn Store,
    catalog: &Catalog,
    account: AccountId,
    now: DateTime<Utc>,
) -> Result<AccountView, StoreError> {
    // One read for both, so that `overrides` and `override_history` agree.
    let (plan_history, override_changes) = store.plans_and_override_changes(&account).await?;
    // The limits of a resource dropped from the catalog read in minor units.
    let resources: std::collections::BTreeSet<&str> =
        override_changes.iter().map(|c| c.value.resource.as_str()).collect();
    for resource in resources {
        super::warn_if_undeclared(catalog, resource);
    }
    let mut overrides = overrides_as_of(&override_changes, now);
    overrides.sort_by(|a, b| a.resource.cmp(&b.resource));
    let overrides = overrides
        .into_iter()
        .map(|set| OverrideView {
            expired: set.expires_at.is_some_and(|end| end <= now),
            set,
        })
        .collect();
    Ok(AccountView {
        plan: plan_at(catalog, &plan_history, now).to_owned(),
        account,
        plan_history,
        overrides,
        override_history: override_changes.into_iter().map(OverrideChangeView::from).collect(),
    })
}
