//! Idempotency keys.

use std::fmt;

/// The most characters an idempotency key may have.
pub const MAX_KEY_LEN: usize = 255;

/// A client-chosen key, unique per account, that makes a retried post a no-op.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Validates a key: 1 to 255 characters, no control characters.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let len = raw.chars().count();
        if len == 0 {
            return Err("idempotency_key must not be empty".into());
        }
        if len > MAX_KEY_LEN {
            return Err(format!(
                "idempotency_key is {len} characters long; the limit is {MAX_KEY_LEN}"
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err("idempotency_key must not contain control characters".into());
        }
        Ok(Self(raw.to_owned()))
    }

    /// Wraps a value read back from the store, which only ever holds parsed ones.
    pub(crate) fn from_stored(raw: String) -> Self {
        Self(raw)
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
