//! Feature gates: what the plan in force gives an account.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::domain::Catalog;
use crate::domain::catalog::FeatureValue;
use crate::domain::plan::PlanAssignment;
use crate::usage::quota::plan_at;

/// One feature of one account (`GET /v1/accounts/{account}/features/{feature}`
/// and `tally feature`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureView {
    /// The feature's name.
    pub feature: String,
    /// On (a boolean true, or a positive number).
    pub allowed: bool,
    /// The plan's value; when the plan does not list it, "off" in the
    /// feature's type: 0 for a number, false for a switch.
    pub value: FeatureValue,
    /// The plan in force at the instant asked about.
    pub plan: String,
}

/// `feature` for an account whose plan history is `history`, at `at`; an
/// error naming the known features when no plan of the catalog has it.
pub fn feature_at(
    catalog: &Catalog,
    history: &[PlanAssignment],
    feature: &str,
    at: DateTime<Utc>,
) -> Result<FeatureView, String> {
    let known: std::collections::BTreeSet<&String> = catalog.plans.values().flat_map(|p| p.features.keys()).collect();
    if !known.iter().any(|k| k.as_str() == feature) {
        // A name of any length reaches here from the path: echo its start
        // only (review AP: 50 000 characters came back whole).
        const SHOWN: usize = 64;
        let length = feature.chars().count();
        let named = if length > SHOWN {
            let start: String = feature.chars().take(SHOWN).collect();
            format!("'{start}…' ({length} characters)")
        } else {
            format!("'{feature}'")
        };
        let known = if known.is_empty() {
            "this catalog declares none".to_owned()
        } else {
            format!(
                "features: {}",
                known.into_iter().cloned().collect::<Vec<_>>().join(", ")
            )
        };
        return Err(format!("feature {named} is not in the catalog; {known}"));
    }
    let plan = plan_at(catalog, history, at).to_owned();
    let value = catalog
        .plans
        .get(&plan)
        .and_then(|p| p.features.get(feature))
        .cloned()
        .unwrap_or_else(|| absent_value(catalog, feature));
    let allowed = match value {
        FeatureValue::Bool(on) => on,
        FeatureValue::Number(n) => n > 0,
    };
    Ok(FeatureView {
        feature: feature.to_owned(),
        allowed,
        value,
        plan,
    })
}

/// The value of `feature` on a plan that does not list it: off, in the type
/// the feature has elsewhere (one type on every plan: the catalog refuses
/// two), so that a client reading `seats` as a number on one plan reads a
/// number on every plan (0), not `false`.
fn absent_value(catalog: &Catalog, feature: &str) -> FeatureValue {
    match catalog.plans.values().find_map(|p| p.features.get(feature)) {
        Some(FeatureValue::Number(_)) => FeatureValue::Number(0),
        Some(FeatureValue::Bool(_)) | None => FeatureValue::Bool(false),
    }
}
