//! Resource names (the things an account uses: `api_requests`, `llm_tokens`, …).

use std::borrow::Borrow;
use std::fmt;

/// A resource name as written in the catalog: 1 to 64 characters of `a-z0-9_`.
///
/// Parsing checks the shape only; whether the catalog declares the resource is
/// [`crate::domain::Catalog::resource`]'s question.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct ResourceName(String);

impl ResourceName {
    /// Validates the shape of a resource name.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() || raw.len() > 64 {
            return Err("resource must be 1 to 64 characters".into());
        }
        if !raw
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(format!(
                "resource {raw:?} may contain only lowercase letters, digits and _"
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// Wraps a value read back from the store, which only ever holds parsed ones.
    pub(crate) fn from_stored(raw: String) -> Self {
        Self(raw)
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lets maps keyed by resource be looked up by `&str`: the name orders and
/// compares as its text does (derived from the one `String` field).
impl Borrow<str> for ResourceName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
