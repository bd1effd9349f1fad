//! The plan catalog: resources (with their precision), plans, limits and
//! features. Loaded from a TOML file (`--plans`) or the built-in one.

use std::collections::BTreeMap;
use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::amount::{Amount, MAX_DECIMALS, parse_decimal};
use super::plan::{LimitError, parse_limit};
use super::resource::ResourceName;

/// The built-in catalog, the tiers of API.md.
pub const BUILTIN_CATALOG_TOML: &str = include_str!("builtin_catalog.toml");

/// A resource the catalog declares.
#[derive(Debug, Clone, Serialize)]
pub struct ResourceSpec {
    /// Fractional digits an amount may carry (0 to 9).
    pub decimals: u32,
    /// Free text for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The `resource` column of the invoice line that bills a plan's own price,
/// so no resource may take this name.
pub const PLAN_LINE_RESOURCE: &str = "plan";

/// The period a limit counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    /// A UTC day.
    Day,
    /// A UTC calendar month.
    Month,
    /// A running balance that never resets (storage).
    Total,
}

impl Window {
    /// The name used in files, the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Day => "day",
            Window::Month => "month",
            Window::Total => "total",
        }
    }

    /// Parses a name; None if unknown.
    pub fn parse(raw: &str) -> Option<Self> {
        [Window::Day, Window::Month, Window::Total]
            .into_iter()
            .find(|w| w.as_str() == raw)
    }
}

/// What happens at the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    /// Refuse usage past the limit.
    #[default]
    Hard,
    /// Record it, warn, and bill the overage.
    Soft,
}

impl Enforcement {
    /// The name used in files, the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Hard => "hard",
            Enforcement::Soft => "soft",
        }
    }

    /// Parses a name; None if unknown.
    pub fn parse(raw: &str) -> Option<Self> {
        [Enforcement::Hard, Enforcement::Soft]
            .into_iter()
            .find(|e| e.as_str() == raw)
    }
}

/// One plan's rule for one resource.
#[derive(Debug, Clone, Serialize)]
pub struct Limit {
    /// The counting window.
    pub window: Window,
    /// `None` means unlimited.
    pub limit: Option<Amount>,
    /// Hard or soft.
    pub enforcement: Enforcement,
    /// Price per unit over a soft limit.
    #[serde(skip_serializing_if = "Option::is_none", with = "rust_decimal::serde::str_option")]
    pub overage_price: Option<Decimal>,
    /// Units per minute, enforced in-process on consume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_minute: Option<u32>,
}

/// A feature flag's value: a switch or a number.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum FeatureValue {
    /// On or off.
    Bool(bool),
    /// A numeric allowance (seats, projects…).
    Number(i64),
}

/// By hand rather than `#[serde(untagged)]`, whose error ("data did not match
/// any variant") does not say what a feature may be.
impl<'de> Deserialize<'de> for FeatureValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FeatureValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a feature value: true, false or a whole number (e.g. seats = 5)")
            }
            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<FeatureValue, E> {
                Ok(FeatureValue::Bool(on))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<FeatureValue, E> {
                Ok(FeatureValue::Number(n))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<FeatureValue, E> {
                i64::try_from(n)
                    .map(FeatureValue::Number)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(n), &self))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A plan: its price, its limits per resource and its features.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The plan's name.
    pub name: String,
    /// Price per month, exact.
    #[serde(with = "rust_decimal::serde::str")]
    pub price: Decimal,
    /// Limits per resource.
    pub limits: BTreeMap<ResourceName, Limit>,
    /// Features by name.
    pub features: BTreeMap<String, FeatureValue>,
}

/// The whole catalog.
#[derive(Debug, Clone, Serialize)]
pub struct Catalog {
    /// The plan new accounts get.
    pub default_plan: String,
    /// Declared resources.
    pub resources: BTreeMap<ResourceName, ResourceSpec>,
    /// Plans by name.
    pub plans: BTreeMap<String, Plan>,
}

/// A problem in a catalog file, with the line it is on when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogError {
    /// 1-based line, when the problem has a place.
    pub line: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for CatalogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// All problems found in a catalog file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid plan catalog:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
pub struct CatalogErrors(pub Vec<CatalogError>);

/// The resource asked for is not declared.
#[derive(Debug, Clone, thiserror::Error)]
#[error("resource '{name}' is not in the catalog; known: {}", .known.join(", "))]
pub struct UnknownResource {
    /// What was asked for.
    pub name: String,
    /// What the catalog declares.
    pub known: Vec<String>,
}

impl Catalog {
    /// The built-in catalog.
    pub fn builtin() -> Self {
        Self::parse(BUILTIN_CATALOG_TOML).expect("the built-in catalog is valid")
    }

    /// The plans' names, sorted and comma-separated, for messages that say
    /// what a wrong plan name could have been.
    pub fn plan_names(&self) -> String {
        self.plans.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
    }

    /// Parses and validates a catalog file, reporting every problem with its line.
    pub fn parse(text: &str) -> Result<Self, CatalogErrors> {
        let raw: RawCatalog = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| line_of(text, span.start));
            CatalogErrors(vec![CatalogError {
                line,
                message: e.message().to_owned(),
            }])
        })?;
        let mut errors = Vec::new();
        let mut err = |span: std::ops::Range<usize>, message: String| {
            errors.push(CatalogError {
                line: Some(line_of(text, span.start)),
                message,
            })
        };

        let mut resources = BTreeMap::new();
        for (name, spec) in &raw.resources {
            // Both checks, so that one file run shows both problems of a resource.
            let decimals = spec.get_ref().decimals.unwrap_or(0);
            if decimals > MAX_DECIMALS {
                err(
                    spec.span(),
                    format!("resource '{name}' declares {decimals} decimals; at most {MAX_DECIMALS} are supported"),
                );
            }
            let resource = match ResourceName::parse(name) {
                Ok(r) if r.as_str() == PLAN_LINE_RESOURCE => {
                    err(
                        spec.span(),
                        format!(
                            "resource name '{PLAN_LINE_RESOURCE}' is reserved: the invoice marks each plan's own \
                             price line with it; name the resource otherwise"
                        ),
                    );
                    continue;
                }
                Ok(r) => r,
                Err(e) => {
                    err(spec.span(), e);
                    continue;
                }
            };
            resources.insert(
                resource,
                ResourceSpec {
                    decimals,
                    description: spec.get_ref().description.clone(),
                },
            );
        }

        let known = resources.keys().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
        let mut plans = BTreeMap::new();
        for (plan_name, raw_plan) in &raw.plans {
            // Plan names travel in URLs' bodies, logs and invoice CSVs; a blank
            // or oddly spelled one is a typo far more often than an intent.
            if plan_name.is_empty()
                || plan_name.len() > 64
                || !plan_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            {
                err(
                    raw_plan.span(),
                    format!("plan name {plan_name:?} must be 1 to 64 characters of A-Za-z0-9_.-"),
                );
            }
            let price = match parse_money(raw_plan.get_ref().price.get_ref(), "price") {
                Ok(p) => p,
                Err(e) => {
                    err(raw_plan.get_ref().price.span(), format!("plan '{plan_name}': {e}"));
                    Decimal::ZERO
                }
            };
            let mut limits = BTreeMap::new();
            for (resource_name, raw_limit) in &raw_plan.get_ref().limits {
                let Some((resource, spec)) = resources.get_key_value(resource_name.as_str()) else {
                    err(
                        raw_limit.span(),
                        format!(
                            "plan '{plan_name}' limits resource '{resource_name}', which is not declared; known: {known}"
                        ),
                    );
                    continue;
                };
                let l = raw_limit.get_ref();
                let limit = match parse_limit(l.limit.get_ref(), spec.decimals) {
                    Ok(limit) => limit,
                    Err(e) => {
                        let why = match e {
                            LimitError::Negative => "limit must not be negative".to_owned(),
                            LimitError::Invalid(e) => format!("limit: {e} (or write \"unlimited\")"),
                        };
                        err(
                            l.limit.span(),
                            format!("plan '{plan_name}', resource '{resource_name}': {why}"),
                        );
                        None
                    }
                };
                let enforcement = l.enforcement.unwrap_or_default();
                let overage_price = match &l.overage_price {
                    None => None,
                    Some(p) if enforcement == Enforcement::Hard => {
                        err(
                            p.span(),
                            format!(
                                "plan '{plan_name}', resource '{resource_name}': overage_price needs enforcement = \"soft\""
                            ),
                        );
                        None
                    }
                    Some(p) => match parse_money(p.get_ref(), "overage_price") {
                        Ok(d) => Some(d),
                        Err(e) => {
                            err(p.span(), format!("plan '{plan_name}', resource '{resource_name}': {e}"));
                            None
                        }
                    },
                };
                if l.rate_per_minute == Some(0) {
                    err(
                        raw_limit.span(),
                        format!(
                            "plan '{plan_name}', resource '{resource_name}': rate_per_minute must be at least 1 (leave it out for no rate limit)"
                        ),
                    );
                }
                limits.insert(
                    resource.clone(),
                    Limit {
                        window: l.window,
                        limit,
                        enforcement,
                        overage_price,
                        rate_per_minute: l.rate_per_minute,
                    },
                );
            }
            plans.insert(
                plan_name.clone(),
                Plan {
                    name: plan_name.clone(),
                    price,
                    limits,
                    features: raw_plan.get_ref().features.clone(),
                },
            );
        }
        if !plans.contains_key(raw.default_plan.get_ref()) {
            err(
                raw.default_plan.span(),
                format!(
                    "default_plan '{}' is not a plan of this catalog; plans: {}",
                    raw.default_plan.get_ref(),
                    plans.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        if resources.is_empty() {
            errors.push(CatalogError {
                line: None,
                message: "the catalog declares no resources; add a [resources.NAME] table".into(),
            });
        }
        if !errors.is_empty() {
            return Err(CatalogErrors(errors));
        }
        Ok(Self {
            default_plan: raw.default_plan.into_inner(),
            resources,
            plans,
        })
    }

    /// Looks a resource up by name; the error lists what is known.
    pub fn resource(&self, name: &str) -> Result<(&ResourceName, &ResourceSpec), UnknownResource> {
        self.resources.get_key_value(name).ok_or_else(|| UnknownResource {
            name: name.to_owned(),
            known: self.resources.keys().map(|r| r.to_string()).collect(),
        })
    }

    /// The limit `plan` sets on `resource`; None when either is not in the
    /// catalog or the plan does not list the resource.
    pub fn limit(&self, plan: &str, resource: &ResourceName) -> Option<&Limit> {
        self.plans.get(plan).and_then(|p| p.limits.get(resource))
    }

    /// The fractional digits of a resource; 0 for one the catalog no longer declares.
    pub fn decimals(&self, resource: &str) -> u32 {
        self.resource(resource).map_or(0, |(_, spec)| spec.decimals)
    }
}

fn parse_money(text: &str, field: &str) -> Result<Decimal, String> {
    match parse_decimal(text) {
        Ok(d) if d.is_sign_negative() && !d.is_zero() => Err(format!("{field} must not be negative")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{field}: {e}")),
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    default_plan: Spanned<String>,
    resources: BTreeMap<String, Spanned<RawResource>>,
    #[serde(default)]
    plans: BTreeMap<String, Spanned<RawPlan>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    decimals: Option<u32>,
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    price: Spanned<String>,
    #[serde(default)]
    limits: BTreeMap<String, Spanned<RawLimit>>,
    #[serde(default)]
    features: BTreeMap<String, FeatureValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    window: Window,
    limit: Spanned<String>,
    enforcement: Option<Enforcement>,
    overage_price: Option<Spanned<String>>,
    rate_per_minute: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_catalog_has_the_brief_s_tiers() {
        let catalog = Catalog::builtin();
        assert_eq!(catalog.default_plan, "free");
        assert_eq!(catalog.decimals("agent_minutes"), 2);
        let free = &catalog.plans["free"];
        let api = &free.limits[&ResourceName::parse("api_requests").unwrap()];
        assert_eq!(api.limit.unwrap().to_string(), "100000");
        assert_eq!(api.rate_per_minute, Some(100));
        let pro_tokens = &catalog.plans["pro"].limits[&ResourceName::parse("llm_tokens").unwrap()];
        assert_eq!(pro_tokens.enforcement, Enforcement::Soft);
        assert_eq!(pro_tokens.overage_price.unwrap().to_string(), "0.00002");
    }

    #[test]
    fn semantic_errors_name_their_line() {
        let text = "default_plan = \"gold\"\n[resources.api_requests]\ndecimals = 12\n[plans.free]\nprice = \"0\"\n[plans.free.limits.tokens]\nwindow = \"day\"\nlimit = \"5\"\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        let lines: Vec<_> = errors.iter().map(|e| (e.line, e.message.clone())).collect();
        assert!(
            errors
                .iter()
                .any(|e| e.line == Some(1) && e.message.contains("default_plan 'gold'")),
            "{lines:?}"
        );
        assert!(errors.iter().any(|e| e.message.contains("12 decimals")), "{lines:?}");
        assert!(
            errors.iter().any(|e| e
                .message
                .contains("'tokens', which is not declared; known: api_requests")),
            "{lines:?}"
        );
    }

    #[test]
    fn the_format_example_in_docs_plans_md_is_a_valid_catalog() {
        let doc = include_str!("../../docs/plans.md");
        let start = doc.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let example = &doc[start..start + doc[start..].find("```").expect("its end")];
        let catalog = Catalog::parse(example).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(catalog.default_plan, "free");
        assert_eq!(catalog.decimals("agent_minutes"), 2);
        assert!(catalog.plans.contains_key("pro"));
    }

    #[test]
    fn a_badly_named_resource_also_reports_its_decimals() {
        let text = "default_plan = \"free\"\n[resources.Tokens]\ndecimals = 10\n[plans.free]\nprice = \"0\"\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        let messages: Vec<_> = errors.iter().map(|e| e.message.as_str()).collect();
        assert!(messages.iter().any(|m| m.contains("10 decimals")), "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("Tokens")), "{messages:?}");
    }

    #[test]
    fn a_resource_named_plan_is_refused() {
        let text = "default_plan = \"free\"\n[resources.plan]\n[plans.free]\nprice = \"0\"\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        assert!(
            errors
                .iter()
                .any(|e| e.line == Some(2) && e.message.contains("'plan' is reserved")),
            "{errors:?}"
        );
    }

    #[test]
    fn a_blank_or_oddly_spelled_plan_name_is_refused_with_its_line() {
        let text = "default_plan = \"free\"\n[resources.x]\n[plans.free]\nprice = \"0\"\n[plans.\"\"]\nprice = \"0\"\n[plans.\"pro plus\"]\nprice = \"1\"\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].line == Some(5) && errors[0].message.contains("plan name \"\" must be"),
            "{errors:?}"
        );
        assert!(
            errors[1].line == Some(7) && errors[1].message.contains("\"pro plus\""),
            "{errors:?}"
        );
    }

    #[test]
    fn a_feature_that_is_neither_a_switch_nor_a_whole_number_says_what_it_may_be() {
        let text =
            "default_plan = \"free\"\n[resources.x]\n[plans.free]\nprice = \"0\"\nfeatures = { seats = \"5\" }\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        assert_eq!(errors[0].line, Some(5), "{errors:?}");
        assert!(
            errors[0].message.contains("true, false or a whole number"),
            "{errors:?}"
        );
        let text = text.replace("\"5\"", "5");
        let catalog = Catalog::parse(&text).unwrap();
        assert_eq!(catalog.plans["free"].features["seats"], FeatureValue::Number(5));
    }

    #[test]
    fn syntax_errors_name_their_line() {
        let errors = Catalog::parse("default_plan = \"free\"\n[resources.x]\ndecimals = = 1\n")
            .unwrap_err()
            .0;
        assert_eq!(errors[0].line, Some(3), "{errors:?}");
    }

    #[test]
    fn unknown_resource_lists_what_is_known() {
        let e = Catalog::builtin().resource("tokens").unwrap_err();
        assert_eq!(
            e.to_string(),
            "resource 'tokens' is not in the catalog; known: agent_minutes, ai_generations, api_requests, llm_tokens, storage_bytes"
        );
    }
}
