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

impl FeatureValue {
    /// The type, in words for a catalog's author.
    fn kind(&self) -> &'static str {
        match self {
            Self::Bool(_) => "a switch (true or false)",
            Self::Number(_) => "a number",
        }
    }
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
            if let Some(errors) = oversized_integer(text, &e) {
                return CatalogErrors(sorted(errors));
            }
            // serde words some shapes badly or not at all ("expected a
            // borrowed string" for `[plans.pro.v2]`): say what they are.
            let mut errors = layout_errors(text);
            if errors.is_empty() {
                errors.push(CatalogError {
                    line: e.span().map(|span| line_of(text, span.start)),
                    message: e.message().to_owned(),
                });
            }
            CatalogErrors(sorted(errors))
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
            // A wrong count leaves MAX_DECIMALS, at which the resource's
            // limits are still checked: the count written may be past the
            // 28 digits a decimal scales to, where checking a limit panicked.
            let decimals = match &spec.get_ref().decimals {
                None => 0,
                Some(value) => match value.get_ref() {
                    RawWhole::Int(n) => match u32::try_from(*n) {
                        Ok(decimals) if decimals <= MAX_DECIMALS => decimals,
                        _ => {
                            let why = if *n < 0 {
                                format!("decimals is 0 to {MAX_DECIMALS}, the fractional digits an amount may carry")
                            } else {
                                format!("at most {MAX_DECIMALS} are supported")
                            };
                            err(value.span(), format!("resource '{name}' declares {n} decimals; {why}"));
                            MAX_DECIMALS
                        }
                    },
                    RawWhole::Other => {
                        err(
                            value.span(),
                            format!(
                                "resource '{name}': decimals = {} is not a bare whole number; decimals is 0 to \
                                 {MAX_DECIMALS}, the fractional digits an amount may carry, written without quotes \
                                 (decimals = 2)",
                                written(text, value)
                            ),
                        );
                        MAX_DECIMALS
                    }
                },
            };
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
            if !is_valid_plan_name(plan_name) {
                err(
                    raw_plan.span(),
                    format!("plan name {plan_name:?} must be 1 to 64 characters of A-Za-z0-9_.-"),
                );
            }
            let price = match &raw_plan.get_ref().price {
                None => {
                    err(
                        raw_plan.span(),
                        format!(
                            "plan '{plan_name}' has no price; add price = \"0\" (its monthly price, a decimal \
                             string such as \"9.99\") to {}",
                            header(&["plans", plan_name])
                        ),
                    );
                    Decimal::ZERO
                }
                Some(price) => match exact(text, price, "price").and_then(|p| parse_money(p, "price")) {
                    Ok(p) => p,
                    Err(e) => {
                        err(price.span(), format!("plan '{plan_name}': {e}"));
                        Decimal::ZERO
                    }
                },
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
                let Some(raw_limit_value) = &l.limit else {
                    err(
                        raw_limit.span(),
                        format!(
                            "plan '{plan_name}', resource '{resource_name}': the limit table has no limit; add limit = \"N\" \
                             (in the resource's units) or limit = \"unlimited\" to {}",
                            header(&["plans", plan_name, "limits", resource_name])
                        ),
                    );
                    continue;
                };
                let limit = match exact(text, raw_limit_value, "limit").and_then(|raw| {
                    parse_limit(raw, spec.decimals).map_err(|e| match e {
                        LimitError::Negative => "limit must not be negative".to_owned(),
                        LimitError::Invalid(e) => format!("limit: {e} (or write \"unlimited\")"),
                    })
                }) {
                    Ok(limit) => limit,
                    Err(why) => {
                        err(
                            raw_limit_value.span(),
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
                    // Nothing is ever over an unlimited limit, so the
                    // price would be a bill that never comes.
                    Some(p) if matches!(raw_limit_value.get_ref(), RawNumber::Exact(raw) if raw == "unlimited") => {
                        err(
                            p.span(),
                            format!(
                                "plan '{plan_name}', resource '{resource_name}': overage_price can never apply: the \
                                 limit is \"unlimited\", so no usage is ever over it; remove overage_price, or set a \
                                 limit"
                            ),
                        );
                        None
                    }
                    Some(p) => {
                        match exact(text, p, "overage_price").and_then(|raw| parse_money(raw, "overage_price")) {
                            Ok(d) => Some(d),
                            Err(e) => {
                                err(p.span(), format!("plan '{plan_name}', resource '{resource_name}': {e}"));
                                None
                            }
                        }
                    }
                };
                let rate_per_minute = l.rate_per_minute.as_ref().and_then(|value| {
                    let rate = match value.get_ref() {
                        RawWhole::Int(n) => match u32::try_from(*n) {
                            Ok(rate) if rate >= 1 => Ok(rate),
                            _ if *n < 1 => Err("must be at least 1"),
                            _ => Err("is past the largest rate"),
                        },
                        RawWhole::Other => Err("is not a bare whole number"),
                    };
                    rate.map_err(|why| {
                        err(
                            value.span(),
                            format!(
                                "plan '{plan_name}', resource '{resource_name}': rate_per_minute = {} {why}; {RATE_RULE}",
                                written(text, value)
                            ),
                        )
                    })
                    .ok()
                });
                let Some(window) = l.window else {
                    err(
                        raw_limit.span(),
                        format!(
                            "plan '{plan_name}', resource '{resource_name}': the limit has no window; add window = \
                             \"day\" (a UTC day), \"month\" (a UTC calendar month) or \"total\" (a running \
                             balance) to {}",
                            header(&["plans", plan_name, "limits", resource_name])
                        ),
                    );
                    continue;
                };
                limits.insert(
                    resource.clone(),
                    Limit {
                        window,
                        limit,
                        enforcement,
                        overage_price,
                        rate_per_minute,
                    },
                );
            }
            plans.insert(
                plan_name.clone(),
                Plan {
                    name: plan_name.clone(),
                    price,
                    limits,
                    features: raw_plan
                        .get_ref()
                        .features
                        .iter()
                        .map(|(name, value)| (name.clone(), value.get_ref().clone()))
                        .collect(),
                },
            );
        }
        // One type per feature across plans: a client reads `seats` as a
        // number on every plan, and a plan without it answers that type's
        // "off" (0 or false), which two types would leave undecided.
        let mut declared: BTreeMap<&str, (&str, &'static str)> = BTreeMap::new();
        for (plan_name, raw_plan) in &raw.plans {
            for (feature, value) in &raw_plan.get_ref().features {
                let kind = value.get_ref().kind();
                match declared.get(feature.as_str()) {
                    None => {
                        declared.insert(feature, (plan_name, kind));
                    }
                    Some(&(first_plan, first_kind)) if first_kind != kind => err(
                        value.span(),
                        format!(
                            "plan '{plan_name}': feature '{feature}' is {kind} here and {first_kind} on plan \
                             '{first_plan}'; give it one type on every plan (a number, 0 for none; or true/false)"
                        ),
                    ),
                    Some(_) => {}
                }
            }
        }
        let valid_plans = || {
            plans
                .keys()
                .map(String::as_str)
                .filter(|name| is_valid_plan_name(name))
                .collect::<Vec<_>>()
        };
        let no_default_plan = raw.default_plan.is_none().then(|| CatalogError {
            line: Some(1),
            message: format!(
                "the catalog has no default_plan; add default_plan = \"NAME\" at the top, before any table: the \
                 plan new accounts get ({})",
                match valid_plans().as_slice() {
                    [] => "and add that plan's [plans.NAME] table".to_owned(),
                    valid => format!("one of: {}", valid.join(", ")),
                }
            ),
        });
        if let Some(default_plan) = &raw.default_plan {
            let default_plan_span = default_plan.span();
            let default_plan = default_plan.get_ref();
            if !plans.contains_key(default_plan) {
                // Only names that are themselves valid: a broken one has its own
                // error, and offering it here would send the user in a circle.
                let valid = valid_plans();
                let add = if is_valid_plan_name(default_plan) {
                    format!("add a [plans.{}] table", toml_key(default_plan))
                } else {
                    "name a plan that is 1 to 64 characters of A-Za-z0-9_.-".to_owned()
                };
                let message = if valid.is_empty() {
                    format!(
                        "default_plan '{default_plan}' is not a plan of this catalog, which has no validly named plan; {add}"
                    )
                } else {
                    format!(
                        "default_plan '{default_plan}' is not a plan of this catalog; set it to one of: {} (or {add})",
                        valid.join(", ")
                    )
                };
                err(default_plan_span, message);
            }
        }
        errors.extend(no_default_plan);
        // Resources written but each refused have their own errors; this one
        // would tell the author to add what is already there.
        if raw.resources.is_empty() {
            errors.push(CatalogError {
                line: None,
                message: "the catalog declares no resources; add a [resources.NAME] table".into(),
            });
        }
        if !errors.is_empty() {
            return Err(CatalogErrors(sorted(errors)));
        }
        Ok(Self {
            default_plan: raw.default_plan.map(Spanned::into_inner).unwrap_or_default(),
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

/// Plan names travel in URLs' bodies, logs and invoice CSVs; a blank or
/// oddly spelled one is a typo far more often than an intent.
fn is_valid_plan_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The problems in file order, those without a line last.
fn sorted(mut errors: Vec<CatalogError>) -> Vec<CatalogError> {
    errors.sort_by_key(|e| (e.line.is_none(), e.line));
    errors
}

/// The text of an amount written as a string or a bare integer; a float is
/// refused with the file's own digits as the string to write instead.
fn exact<'a>(text: &str, value: &'a Spanned<RawNumber>, field: &str) -> Result<&'a str, String> {
    match value.get_ref() {
        RawNumber::Exact(raw) => Ok(raw),
        RawNumber::Float => {
            let written = written(text, value);
            let digits = written.replace('_', "");
            let digits = digits.strip_prefix('+').unwrap_or(&digits);
            let example = match parse_decimal(digits) {
                Ok(_) => digits,
                Err(_) if field == "limit" => "100000",
                Err(_) => "9.99",
            };
            Err(format!(
                "{field} = {written} is a TOML float, which is not exact (a binary float cannot hold most \
                 decimals); write it as a string: {field} = \"{example}\""
            ))
        }
    }
}

/// A key as a TOML table header spells it: bare when it can be, else quoted.
fn toml_key(key: &str) -> String {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')) {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// A table header from its keys, each spelled as [`toml_key`] does.
fn header(keys: &[&str]) -> String {
    format!("[{}]", keys.iter().map(|k| toml_key(k)).collect::<Vec<_>>().join("."))
}

/// The keys of a plan's table ([`RawPlan`]).
const PLAN_FIELDS: [&str; 3] = ["price", "limits", "features"];
/// The keys of a resource's table ([`RawResource`]).
const RESOURCE_FIELDS: [&str; 2] = ["decimals", "description"];
/// The keys of a limit's table ([`RawLimit`]).
const LIMIT_FIELDS: [&str; 5] = ["window", "limit", "enforcement", "overage_price", "rate_per_minute"];

/// Explains shapes that the typed read reports badly, found on the file's
/// syntax tree: a plan, resource or limit name with a dot written unquoted
/// (TOML reads `[plans.pro.v2]` as a table `v2` inside plan `pro`; serde
/// said "unknown field `v2`", or, when `[plans.pro]` was not there at all,
/// "invalid type: string \"v2\", expected a borrowed string"), and a plan
/// given only through its sub-tables. Empty when there is none of these, and
/// for a file that is not TOML (the typed read names that error).
fn layout_errors(text: &str) -> Vec<CatalogError> {
    use toml_edit::{Item, TableLike};

    let Ok(doc) = toml_edit::ImDocument::parse(text) else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    // The line of `key` in `table`: where the key is written (in a header
    // `[plans.pro.v2]`, the `v2`), else where its value is.
    let line = |table: &dyn TableLike, key: &str, item: &Item| {
        table
            .key(key)
            .and_then(toml_edit::Key::span)
            .or_else(|| item.span())
            .map(|span| line_of(text, span.start))
    };
    // Tables inside a resource's (or a limit's) table, where none belong.
    let dotted_resource = |errors: &mut Vec<CatalogError>, table: &dyn TableLike, keys: &[&str], fields: &[&str]| {
        let Some(resource) = keys.last() else { return };
        for (key, item) in table.iter() {
            if item.is_table_like() && !fields.contains(&key) {
                let (inside, fix) = if keys[0] == "resources" {
                    ("resource", format!("name it e.g. {resource}_{key}"))
                } else {
                    let example = format!("{resource}_{key}");
                    (
                        "the limit on resource",
                        format!(
                            "use the name the resource has under [resources] (e.g. {})",
                            header(&[&keys[..keys.len() - 1], &[example.as_str()]].concat())
                        ),
                    )
                };
                errors.push(CatalogError {
                    line: line(table, key, item),
                    message: format!(
                        "{} is read by TOML as a table '{key}' inside {inside} '{resource}', and a resource name \
                         cannot hold a dot (lowercase letters, digits and _ only): {fix}",
                        header(&[keys, &[key]].concat()),
                    ),
                });
            }
        }
    };

    let root = doc.as_table();
    if let Some(resources) = root.get("resources").and_then(Item::as_table_like) {
        for (name, item) in resources.iter() {
            if let Some(resource) = item.as_table_like() {
                dotted_resource(&mut errors, resource, &["resources", name], &RESOURCE_FIELDS);
            }
        }
    }
    let Some(plans) = root.get("plans").and_then(Item::as_table_like) else {
        return errors;
    };
    for (name, item) in plans.iter() {
        let Some(plan) = item.as_table_like() else { continue };
        let before = errors.len();
        dotted_plans(&mut errors, plan, &mut vec![name], &line);
        if let Some(limits) = plan.get("limits").and_then(Item::as_table_like) {
            for (resource, limit) in limits.iter() {
                if let Some(limit) = limit.as_table_like() {
                    dotted_resource(&mut errors, limit, &["plans", name, "limits", resource], &LIMIT_FIELDS);
                }
            }
        }
        // `[plans.pro.limits.x]` with no `[plans.pro]`: serde cannot place
        // the implicit table `pro` and says "expected a borrowed string".
        let implicit = item.as_table().is_some_and(toml_edit::Table::is_implicit);
        if errors.len() == before && implicit && !plan.contains_key("price") {
            let first = plan.iter().next();
            errors.push(CatalogError {
                line: first.and_then(|(key, item)| line(plan, key, item)),
                message: format!(
                    "plan '{name}' has sub-tables but no table of its own, so no price: add {} with price = \"…\" \
                     (its monthly price, e.g. \"0\") above them",
                    header(&["plans", name])
                ),
            });
        }
    }
    errors
}

/// Tables inside a plan's table that look like a plan (a price, limits or
/// features, or nothing yet): a plan name with a dot written unquoted.
/// `keys` holds the plan's name and the tables walked down to `table`.
fn dotted_plans<'a>(
    errors: &mut Vec<CatalogError>,
    table: &'a dyn toml_edit::TableLike,
    keys: &mut Vec<&'a str>,
    line: &dyn Fn(&dyn toml_edit::TableLike, &str, &toml_edit::Item) -> Option<usize>,
) {
    for (key, item) in table.iter() {
        if PLAN_FIELDS.contains(&key) {
            continue;
        }
        let Some(inner) = item.as_table_like() else { continue };
        keys.push(key);
        if inner.is_empty() || PLAN_FIELDS.iter().any(|field| inner.contains_key(field)) {
            let name = keys.join(".");
            let quoted = format!("[plans.{}]", toml_key(&name));
            let limits = format!("[plans.{}.limits.RESOURCE]", toml_key(&name));
            errors.push(CatalogError {
                line: line(table, key, item),
                message: format!(
                    "{} is read by TOML as a table '{}' inside plan '{}', not as a plan named '{name}': a plan name \
                     with a dot must be quoted in table headers; write {quoted} (and {limits} for its limits)",
                    header(&[&["plans"][..], keys].concat()),
                    keys[1..].join("."),
                    keys[0],
                ),
            });
        } else {
            dotted_plans(errors, inner, keys, line);
        }
        keys.pop();
    }
}

/// A bare integer past TOML's 64 bits fails the whole read with "number too
/// large (or small) to fit in target type", which names neither the field
/// nor its bound: name both. TOML stops at the first such literal, so it is
/// the only error said; a `limit`, `price` or `overage_price` is told to be
/// written as a string (docs/plans.md), whose own rule is then checked on
/// the next run. None when the error is not such an integer.
fn oversized_integer(text: &str, error: &toml::de::Error) -> Option<Vec<CatalogError>> {
    // The error's span starts at the literal.
    let start = error.span()?.start;
    let rest = text.get(start..)?;
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '_' | '+' | '-')))
        .unwrap_or(rest.len());
    let written = &rest[..end];
    let digits = written.replace('_', "");
    let digits = digits.strip_prefix('+').unwrap_or(&digits);
    let magnitude = digits.strip_prefix('-').unwrap_or(digits);
    if magnitude.is_empty() || !magnitude.bytes().all(|b| b.is_ascii_digit()) || digits.parse::<i64>().is_ok() {
        return None;
    }
    // The key it is the value of: the end of its line before it (`limit =`,
    // or `{ window = "day", limit =` in an inline table).
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let before = text[line_start..start].trim_end().strip_suffix('=')?.trim_end();
    let key = before
        .trim_end_matches(['"', '\''])
        .rsplit(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
        .next()
        .filter(|key| !key.is_empty())?;
    let line = Some(line_of(text, start));
    let message = match key {
        "limit" => format!(
            "limit = {written} is past the largest integer TOML holds ({}); a limit's minor units must fit 64 \
             bits: write a smaller limit, or \"unlimited\"",
            i64::MAX
        ),
        "price" | "overage_price" => format!(
            "{key} = {written} is past the largest integer TOML holds ({}); write it as a string: {key} = \"{digits}\"",
            i64::MAX
        ),
        "decimals" => format!(
            "decimals = {written} is out of range; decimals is 0 to {MAX_DECIMALS}, the fractional digits an \
             amount may carry"
        ),
        "rate_per_minute" => format!("rate_per_minute = {written} is out of range; {RATE_RULE}"),
        _ => format!(
            "{key} = {written} is past the range of a TOML integer, {} to {}",
            i64::MIN,
            i64::MAX
        ),
    };
    Some(vec![CatalogError { line, message }])
}

/// What `rate_per_minute` may be, for its errors.
const RATE_RULE: &str = "rate_per_minute is a whole number of units per minute, 1 to 4294967295, written \
                         without quotes (rate_per_minute = 100); leave it out for no rate limit";

/// A value as the file writes it, for a message that quotes it.
fn written<'a, T>(text: &'a str, value: &Spanned<T>) -> &'a str {
    text.get(value.span()).unwrap_or_default().trim()
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    // Optional here so that its absence says what to write.
    default_plan: Option<Spanned<String>>,
    // Optional here so that a file without it gets the catalog's own
    // message ("declares no resources; add …"), not serde's "missing field".
    #[serde(default)]
    resources: BTreeMap<String, Spanned<RawResource>>,
    #[serde(default)]
    plans: BTreeMap<String, Spanned<RawPlan>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    decimals: Option<Spanned<RawWhole>>,
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    // Optional here, as `window` below, so that a plan without one is told
    // what to write rather than serde's "missing field".
    price: Option<Spanned<RawNumber>>,
    #[serde(default)]
    limits: BTreeMap<String, Spanned<RawLimit>>,
    #[serde(default)]
    features: BTreeMap<String, Spanned<FeatureValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    // Optional here so that its absence is reported with the plan, the
    // resource and the values it may take, not as serde's "missing field".
    window: Option<Window>,
    limit: Option<Spanned<RawNumber>>,
    enforcement: Option<Enforcement>,
    overage_price: Option<Spanned<RawNumber>>,
    rate_per_minute: Option<Spanned<RawWhole>>,
}

/// A count (`decimals`, `rate_per_minute`) as the file writes it: any
/// scalar is read, so that a wrong one is reported with its resource and
/// its range among every other problem, not as serde's "expected u32".
enum RawWhole {
    /// A TOML integer, in range or not.
    Int(i64),
    /// A string, float or boolean. Its value is not kept; the message
    /// quotes the file's text.
    Other,
}

impl<'de> Deserialize<'de> for RawWhole {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawWhole;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<RawWhole, E> {
                Ok(RawWhole::Int(n))
            }
            // TOML integers are i64; past that is past every range anyway.
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<RawWhole, E> {
                Ok(RawWhole::Int(i64::try_from(n).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<RawWhole, E> {
                Ok(RawWhole::Other)
            }
            // Refused, its value dropped unread.
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<RawWhole, E> {
                Ok(RawWhole::Other)
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<RawWhole, E> {
                Ok(RawWhole::Other)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A price or limit as the file writes it.
enum RawNumber {
    /// A string, or a bare TOML integer kept as its digits: both exact.
    Exact(String),
    /// A TOML float, refused: its decimal digits are already lost in binary.
    /// Its value is not kept; the message quotes the file's text.
    Float,
}

impl<'de> Deserialize<'de> for RawNumber {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawNumber;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal string such as \"9.99\", or a whole number")
            }
            fn visit_str<E: serde::de::Error>(self, raw: &str) -> Result<RawNumber, E> {
                Ok(RawNumber::Exact(raw.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<RawNumber, E> {
                Ok(RawNumber::Exact(n.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<RawNumber, E> {
                Ok(RawNumber::Exact(n.to_string()))
            }
            // A TOML float is refused, its value dropped unread: the error
            // quotes the file's own digits instead (see `exact`).
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<RawNumber, E> {
                Ok(RawNumber::Float)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
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
    fn resources_declared_but_refused_are_not_also_reported_missing() {
        let text = "default_plan = \"free\"\n[resources.X-y]\n[plans.free]\nprice = \"0\"\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, Some(2), "{errors:?}");
        assert!(
            errors[0].message.contains("resource \"X-y\" may contain only"),
            "{errors:?}"
        );
        // With none written at all, that is the problem, with what to do.
        let none = Catalog::parse("default_plan = \"free\"\n[plans.free]\nprice = \"0\"\n")
            .unwrap_err()
            .0;
        assert_eq!(none.len(), 1, "{none:?}");
        assert_eq!(
            none[0].message,
            "the catalog declares no resources; add a [resources.NAME] table"
        );
    }

    #[test]
    fn decimals_past_any_amount_s_precision_are_an_error_not_a_panic() {
        let text = "default_plan = \"free\"\n[resources.x]\ndecimals = 100\n[plans.free]\nprice = \"0\"\n[plans.free.limits.x]\nwindow = \"day\"\nlimit = \"1\"\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].message.contains("100 decimals"), "{errors:?}");
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
    fn a_feature_given_two_types_across_plans_is_refused_at_its_second_line() {
        let text = "default_plan = \"free\"\n[resources.x]\n[plans.free]\nprice = \"0\"\nfeatures = { seats = true }\n\
                    [plans.pro]\nprice = \"10\"\nfeatures = { seats = 5, git_export = true }\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, Some(8));
        assert_eq!(
            errors[0].message,
            "plan 'pro': feature 'seats' is a number here and a switch (true or false) on plan 'free'; give it one \
             type on every plan (a number, 0 for none; or true/false)"
        );
        let same = text.replace("seats = true", "seats = 0");
        assert!(Catalog::parse(&same).is_ok());
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
    fn bare_integers_are_exact_amounts_like_their_string_form() {
        let text = "default_plan = \"free\"\n[resources.api_requests]\n[resources.llm_tokens]\n[plans.free]\nprice = 10\n[plans.free.limits.api_requests]\nwindow = \"month\"\nlimit = 100_000\n[plans.free.limits.llm_tokens]\nwindow = \"day\"\nlimit = 50000\nenforcement = \"soft\"\noverage_price = 0\n";
        let catalog = Catalog::parse(text).unwrap_or_else(|e| panic!("{e}"));
        let free = &catalog.plans["free"];
        assert_eq!(free.price, Decimal::from(10));
        let api = &free.limits[&ResourceName::parse("api_requests").unwrap()];
        assert_eq!(api.limit.unwrap().to_string(), "100000");
        let tokens = &free.limits[&ResourceName::parse("llm_tokens").unwrap()];
        assert_eq!(tokens.overage_price, Some(Decimal::ZERO));
        let negative = Catalog::parse(&text.replace("price = 10", "price = -3")).unwrap_err().0;
        assert_eq!(negative.len(), 1, "{negative:?}");
        assert_eq!(negative[0].line, Some(5), "{negative:?}");
        assert!(
            negative[0].message.contains("price must not be negative"),
            "{negative:?}"
        );
    }

    #[test]
    fn a_float_amount_is_refused_with_its_field_line_and_string_form() {
        let text = "default_plan = \"free\"\n[resources.llm_tokens]\n[plans.free]\nprice = 9.99\n[plans.free.limits.llm_tokens]\nwindow = \"day\"\nlimit = 5e4\nenforcement = \"soft\"\noverage_price = 0.00002\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        let got: Vec<_> = errors.iter().map(|e| (e.line, e.message.as_str())).collect();
        assert_eq!(errors.len(), 3, "every float, at once: {got:?}");
        assert_eq!(errors[0].line, Some(4), "{got:?}");
        assert!(
            errors[0].message.contains("price = 9.99 is a TOML float")
                && errors[0].message.contains("not exact")
                && errors[0].message.contains("write it as a string: price = \"9.99\""),
            "{got:?}"
        );
        assert_eq!(errors[1].line, Some(7), "{got:?}");
        assert!(errors[1].message.contains("limit = \"5e4\""), "{got:?}");
        assert_eq!(errors[2].line, Some(9), "{got:?}");
        assert!(
            errors[2].message.contains("plan 'free', resource 'llm_tokens'")
                && errors[2].message.contains("overage_price = \"0.00002\""),
            "{got:?}"
        );
        // A float that is no decimal at all still gets a usable example.
        let nan = Catalog::parse(&text.replace("price = 9.99", "price = nan"))
            .unwrap_err()
            .0;
        assert!(nan[0].message.contains("price = \"9.99\""), "{nan:?}");
    }

    #[test]
    fn an_overage_price_on_an_unlimited_soft_limit_is_refused_at_its_line() {
        let text = "default_plan = \"free\"\n[resources.x]\n[plans.free]\nprice = \"0\"\n[plans.free.limits.x]\nwindow = \"day\"\nlimit = \"unlimited\"\nenforcement = \"soft\"\noverage_price = \"0.5\"\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, Some(9), "{errors:?}");
        assert_eq!(
            errors[0].message,
            "plan 'free', resource 'x': overage_price can never apply: the limit is \"unlimited\", so no usage is \
             ever over it; remove overage_price, or set a limit"
        );
        // Either fix passes.
        assert!(Catalog::parse(&text.replace("overage_price = \"0.5\"\n", "")).is_ok());
        assert!(Catalog::parse(&text.replace("\"unlimited\"", "\"100\"")).is_ok());
    }

    #[test]
    fn a_missing_price_limit_or_default_plan_says_what_to_write() {
        let no_price = Catalog::parse("default_plan = \"free\"\n[resources.x]\n[plans.free]\n")
            .unwrap_err()
            .0;
        assert_eq!(
            (no_price[0].line, no_price[0].message.as_str()),
            (
                Some(3),
                "plan 'free' has no price; add price = \"0\" (its monthly price, a decimal string such as \"9.99\") to \
                 [plans.free]"
            ),
            "{no_price:?}"
        );
        let no_limit = Catalog::parse(
            "default_plan = \"free\"\n[resources.x]\n[plans.free]\nprice = \"0\"\n[plans.free.limits.x]\nwindow = \"day\"\n",
        )
        .unwrap_err()
        .0;
        assert_eq!(
            (no_limit[0].line, no_limit[0].message.as_str()),
            (
                Some(5),
                "plan 'free', resource 'x': the limit table has no limit; add limit = \"N\" (in the resource's units) \
                 or limit = \"unlimited\" to [plans.free.limits.x]"
            ),
            "{no_limit:?}"
        );
        let no_default = Catalog::parse("[resources.x]\n[plans.free]\nprice = \"0\"\n")
            .unwrap_err()
            .0;
        assert_eq!(
            (no_default.len(), no_default[0].line, no_default[0].message.as_str()),
            (
                1,
                Some(1),
                "the catalog has no default_plan; add default_plan = \"NAME\" at the top, before any table: the plan \
                 new accounts get (one of: free)"
            ),
        );
        // With neither a default nor resources, both are said.
        let empty = Catalog::parse("[plans.free]\nprice = \"0\"\n").unwrap_err().0;
        assert_eq!(empty.len(), 2, "{empty:?}");
    }

    #[test]
    fn a_limit_without_a_window_names_its_table_and_the_windows() {
        let text = "default_plan = \"free\"\n[resources.x]\n[plans.free]\nprice = \"0\"\n[plans.free.limits.x]\nlimit = \"5\"\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, Some(5), "{errors:?}");
        assert_eq!(
            errors[0].message,
            "plan 'free', resource 'x': the limit has no window; add window = \"day\" (a UTC day), \"month\" (a UTC \
             calendar month) or \"total\" (a running balance) to [plans.free.limits.x]"
        );
    }

    #[test]
    fn decimals_that_are_negative_or_not_whole_say_they_are_0_to_9() {
        let text = "default_plan = \"free\"\n[resources.x]\ndecimals = -1\n[resources.y]\ndecimals = \"2\"\n[resources.z]\ndecimals = 2.5\n[plans.free]\nprice = \"0\"\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        let got: Vec<_> = errors.iter().map(|e| (e.line, e.message.as_str())).collect();
        assert_eq!(errors.len(), 3, "each, at once: {got:?}");
        assert_eq!(
            got[0],
            (
                Some(3),
                "resource 'x' declares -1 decimals; decimals is 0 to 9, the fractional digits an amount may carry"
            )
        );
        assert_eq!(
            got[1],
            (
                Some(5),
                "resource 'y': decimals = \"2\" is not a bare whole number; decimals is 0 to 9, the fractional \
                 digits an amount may carry, written without quotes (decimals = 2)"
            )
        );
        assert_eq!(errors[2].line, Some(7), "{got:?}");
        assert!(
            errors[2].message.contains("decimals = 2.5 is not a bare whole number"),
            "{got:?}"
        );
    }

    #[test]
    fn a_rate_per_minute_that_is_not_a_whole_number_from_1_says_what_it_is() {
        let base = "default_plan = \"free\"\n[resources.x]\n[plans.free]\nprice = \"0\"\n[plans.free.limits.x]\nwindow = \"day\"\nlimit = \"5\"\nrate_per_minute = RATE\n";
        let rule = "rate_per_minute is a whole number of units per minute, 1 to 4294967295, written without quotes \
                    (rate_per_minute = 100); leave it out for no rate limit";
        for (rate, why) in [
            ("\"2.5\"", "is not a bare whole number"),
            ("2.5", "is not a bare whole number"),
            ("\"3\"", "is not a bare whole number"),
            ("-1", "must be at least 1"),
            ("0", "must be at least 1"),
            ("4294967296", "is past the largest rate"),
        ] {
            let errors = Catalog::parse(&base.replace("RATE", rate)).unwrap_err().0;
            assert_eq!(errors.len(), 1, "{rate}: {errors:?}");
            assert_eq!(errors[0].line, Some(8), "{rate}: {errors:?}");
            assert_eq!(
                errors[0].message,
                format!("plan 'free', resource 'x': rate_per_minute = {rate} {why}; {rule}")
            );
        }
        let catalog = Catalog::parse(&base.replace("RATE", "4294967295")).unwrap();
        assert_eq!(
            catalog.plans["free"].limits[&ResourceName::parse("x").unwrap()].rate_per_minute,
            Some(u32::MAX)
        );
    }

    #[test]
    fn an_integer_past_toml_s_range_names_its_field_and_bound() {
        let base = "default_plan = \"free\"\n[resources.x]\ndecimals = 2\n[plans.free]\nprice = \"0\"\nfeatures = { seats = 1 }\n[plans.free.limits.x]\nwindow = \"day\"\nlimit = \"5\"\nenforcement = \"soft\"\noverage_price = \"1\"\nrate_per_minute = 1\n";
        let big = "1000000000000000000000";
        let check = |from: &str, to: &str| {
            let text = base.replace(from, to);
            let errors = Catalog::parse(&text).unwrap_err().0;
            assert_eq!(errors.len(), 1, "{to}: {errors:?}");
            let line = text.lines().position(|l| l.contains(to)).map(|i| i + 1);
            assert_eq!(errors[0].line, line, "{to}: {errors:?}");
            errors[0].message.clone()
        };
        let limit = format!(
            "limit = {big} is past the largest integer TOML holds (9223372036854775807); a limit's minor units \
             must fit 64 bits: write a smaller limit, or \"unlimited\""
        );
        assert_eq!(check("limit = \"5\"", &format!("limit = {big}")), limit);
        assert!(
            check("limit = \"5\"", "limit = 1_000_000_000_000_000_000_000")
                .starts_with("limit = 1_000_000_000_000_000_000_000 is past the largest integer TOML holds"),
        );
        // A price has no such bound: its string form is the fix.
        assert_eq!(
            check("overage_price = \"1\"", &format!("overage_price = {big}")),
            format!(
                "overage_price = {big} is past the largest integer TOML holds (9223372036854775807); write it as a \
                 string: overage_price = \"{big}\""
            )
        );
        assert_eq!(
            check("decimals = 2", &format!("decimals = {big}")),
            format!("decimals = {big} is out of range; decimals is 0 to 9, the fractional digits an amount may carry")
        );
        assert!(
            check("rate_per_minute = 1", &format!("rate_per_minute = -{big}")).starts_with(&format!(
                "rate_per_minute = -{big} is out of range; rate_per_minute is a whole number"
            ))
        );
        // TOML stops at the first: that one is said, with its line.
        let text = base
            .replace("limit = \"5\"", &format!("limit = {big}"))
            .replace("overage_price = \"1\"", &format!("overage_price = {big}"));
        let errors = Catalog::parse(&text).unwrap_err().0;
        let got: Vec<_> = errors.iter().map(|e| (e.line, e.message.as_str())).collect();
        assert_eq!(got, [(Some(9), limit.as_str())]);
        assert_eq!(
            check("seats = 1", &format!("seats = {big}")),
            format!("seats = {big} is past the range of a TOML integer, -9223372036854775808 to 9223372036854775807")
        );
    }

    #[test]
    fn errors_come_in_line_order() {
        let text = "default_plan = \"gold\"\n[resources.x]\n[plans.zeta]\nprice = \"-1\"\n[plans.alpha]\nprice = \"x\"\n[plans.\"\"]\nprice = \"0\"\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        let lines: Vec<_> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [Some(1), Some(4), Some(6), Some(7)], "{errors:?}");
    }

    #[test]
    fn an_unquoted_dotted_plan_name_is_explained_with_its_quoted_form() {
        // Without a [plans.pro] table serde said "invalid type: string \"v2\",
        // expected a borrowed string"; with one, "unknown field `v2`".
        for pro in ["", "[plans.pro]\nprice = \"1\"\n"] {
            let text = format!(
                "default_plan = \"free\"\n[resources.x]\n[plans.free]\nprice = \"0\"\n{pro}[plans.pro.v2]\nprice = \"5\"\n"
            );
            let line = 5 + pro.lines().count();
            let errors = Catalog::parse(&text).unwrap_err().0;
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].line, Some(line), "{errors:?}");
            let message = &errors[0].message;
            assert!(
                message.contains("[plans.pro.v2] is read by TOML as a table 'v2' inside plan 'pro'")
                    && message.contains("[plans.\"pro.v2\"]"),
                "{message}"
            );
        }
        // Its limits alone show the same, with the quoted form of their header.
        let text = "default_plan = \"free\"\n[resources.x]\n[plans.free]\nprice = \"0\"\n[plans.pro.v2.limits.x]\nwindow = \"day\"\nlimit = \"1\"\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        assert_eq!(errors[0].line, Some(5), "{errors:?}");
        assert!(errors[0].message.contains("[plans.\"pro.v2\"]"), "{errors:?}");
    }

    #[test]
    fn an_unquoted_dotted_resource_name_says_a_resource_name_has_no_dot() {
        let text = "default_plan = \"free\"\n[resources.x]\n[resources.api.v2]\n[plans.free]\nprice = \"0\"\n[plans.free.limits.x.y]\nwindow = \"day\"\nlimit = \"1\"\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        let got: Vec<_> = errors.iter().map(|e| (e.line, e.message.as_str())).collect();
        assert_eq!(errors.len(), 2, "{got:?}");
        assert_eq!(errors[0].line, Some(3), "{got:?}");
        assert!(
            errors[0]
                .message
                .contains("[resources.api.v2] is read by TOML as a table 'v2' inside resource 'api'")
                && errors[0].message.contains("api_v2"),
            "{got:?}"
        );
        assert_eq!(errors[1].line, Some(6), "{got:?}");
        assert!(
            errors[1].message.contains("[plans.free.limits.x.y]") && errors[1].message.contains("x_y"),
            "{got:?}"
        );
    }

    #[test]
    fn a_plan_with_limits_but_no_table_of_its_own_is_told_to_add_one() {
        let text = "default_plan = \"free\"\n[resources.x]\n[plans.free]\nprice = \"0\"\n[plans.pro.limits.x]\nwindow = \"day\"\nlimit = \"1\"\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, Some(5), "{errors:?}");
        assert!(
            errors[0].message.contains("plan 'pro'") && errors[0].message.contains("add [plans.pro] with price ="),
            "{errors:?}"
        );
    }

    #[test]
    fn a_missing_default_plan_lists_only_validly_named_plans_and_what_to_do() {
        let text = "default_plan = \"gold\"\n[resources.x]\n[plans.free]\nprice = \"0\"\n[plans.\"pro plus\"]\nprice = \"1\"\n[plans.\"\"]\nprice = \"1\"\n";
        let errors = Catalog::parse(text).unwrap_err().0;
        let default = errors
            .iter()
            .find(|e| e.line == Some(1))
            .expect("the default_plan error");
        assert_eq!(
            default.message,
            "default_plan 'gold' is not a plan of this catalog; set it to one of: free (or add a [plans.gold] table)"
        );
        let none = Catalog::parse("default_plan = \"gold\"\n[resources.x]\n[plans.\"a b\"]\nprice = \"1\"\n")
            .unwrap_err()
            .0;
        assert!(
            none[0].message.contains("has no validly named plan") && none[0].message.contains("[plans.gold]"),
            "{none:?}"
        );
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
