//! API keys: roles, secrets and their stored (hashed) form.

use std::fmt;

use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::AccountId;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Post entries, check and consume quota, read any account.
    Service,
    /// Read its own account only.
    Reader,
}

impl Role {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Service => "service",
            Role::Reader => "reader",
        }
    }

    /// Parses a stored name.
    pub fn parse(raw: &str) -> Result<Self, String> {
        match raw {
            "admin" => Ok(Role::Admin),
            "service" => Ok(Role::Service),
            "reader" => Ok(Role::Reader),
            other => Err(format!("unknown role {other:?}; roles are admin, service, reader")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A plaintext key, shown once at creation and never stored.
#[derive(Clone)]
pub struct KeySecret(String);

impl KeySecret {
    /// Makes a new random key: `tly_` and 32 bytes of randomness in hex.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(format!("tly_{}", hex::encode(bytes)))
    }

    /// Wraps a key presented by a client.
    pub fn from_presented(raw: &str) -> Self {
        Self(raw.to_owned())
    }

    /// The plaintext, to print once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The stored form: SHA-256 in hex. Keys are 256 random bits, so a fast
    /// hash is enough (as for GitHub or Stripe tokens); a slow password hash
    /// would only cost every request.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }

    /// The first characters, stored to tell keys apart in listings.
    pub fn prefix(&self) -> String {
        self.0.chars().take(12).collect()
    }
}

impl fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeySecret({}…)", self.prefix())
    }
}

/// A key as the store holds it (no plaintext).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiKey {
    /// Row id.
    pub id: i64,
    /// A name for people.
    pub name: Option<String>,
    /// What it may do.
    pub role: Role,
    /// For readers (and optionally services): the one account it may touch.
    pub account: Option<AccountId>,
    /// The first characters of the plaintext.
    pub prefix: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}
