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
    /// The plan's value; when the plan does not list it, 0 for a feature
    /// that is a number in every plan that lists it, else false.
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
        return Err(format!(
            "feature '{feature}' is not in the catalog; features: {}",
            known.into_iter().cloned().collect::<Vec<_>>().join(", ")
        ));
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
/// the feature has elsewhere, so that a client reading `seats` as a number
/// on one plan reads a number on every plan (0), not `false`. A feature a
/// catalog gives both types keeps false.
fn absent_value(catalog: &Catalog, feature: &str) -> FeatureValue {
    let mut declared = catalog
        .plans
        .values()
        .filter_map(|p| p.features.get(feature))
        .peekable();
    let numeric = declared.peek().is_some() && declared.all(|v| matches!(v, FeatureValue::Number(_)));
    if numeric {
        FeatureValue::Number(0)
    } else {
        FeatureValue::Bool(false)
    }
}
