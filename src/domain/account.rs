//! Account identifiers.

use std::fmt;

/// The most characters an account id may have.
pub const MAX_ACCOUNT_LEN: usize = 128;

/// An account id: 1 to 128 characters of `A-Za-z0-9_.:@-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct AccountId(String);

impl AccountId {
    /// Validates `raw` as an account id.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("account must not be empty".into());
        }
        if raw.chars().count() > MAX_ACCOUNT_LEN {
            return Err(format!(
                "account is {} characters long; the limit is {MAX_ACCOUNT_LEN}",
                raw.chars().count()
            ));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "_.:@-".contains(*c)))
        {
            return Err(format!(
                "account contains {bad:?}; allowed are ASCII letters (A-Z, a-z), digits and _ . : @ -"
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// Wraps a value read back from the store, which only ever holds parsed ones.
    pub(crate) fn from_stored(raw: String) -> Self {
        Self(raw)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        assert!(AccountId::parse("acme_1.eu:team@x-y").is_ok());
    }

    #[test]
    fn rejects_empty_long_and_bad_characters() {
        assert!(AccountId::parse("").is_err());
        assert!(AccountId::parse(&"a".repeat(129)).is_err());
        assert!(AccountId::parse(&"a".repeat(128)).is_ok());
        assert!(AccountId::parse("a b").is_err());
        assert!(AccountId::parse("a/b").is_err());
    }
}
