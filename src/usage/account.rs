//! The account view: the plan in force, the plan history and the overrides,
//! as `GET /v1/accounts/{account}` and `tally accounts show` give it.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::quota::plan_at;
use crate::domain::plan::{Override, PlanAssignment};
use crate::domain::{AccountId, Catalog};
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
    let plan_history = store.plan_history(&account).await?;
    let overrides = store
        .overrides(&account)
        .await?
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
    })
}
