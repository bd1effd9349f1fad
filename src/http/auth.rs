//! Bearer-key authentication and role checks.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;
use crate::domain::{AccountId, KeySecret, Role};

/// Who is calling: the role and account of the presented key.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's role.
    pub role: Role,
    /// The account the key is bound to, if any.
    pub account: Option<AccountId>,
}

impl Caller {
    /// 403 unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role], action: &str) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            Err(ApiError::Forbidden(format!(
                "a {} key cannot {action}; this needs a key with role {}",
                self.role,
                names.join(" or ")
            )))
        }
    }

    /// 403 unless the caller may read `account`: admin and service keys read
    /// any account (unless bound to one), readers only their own.
    pub fn require_read(&self, account: &AccountId) -> Result<(), ApiError> {
        self.require_account(account, "read")
    }

    /// 403 unless the caller may write for `account` (service or admin, bound
    /// to that account if bound at all).
    pub fn require_write(&self, account: &AccountId) -> Result<(), ApiError> {
        self.require(&[Role::Admin, Role::Service], "post entries")?;
        self.require_account(account, "write to")
    }

    fn require_account(&self, account: &AccountId, verb: &str) -> Result<(), ApiError> {
        match (&self.account, self.role) {
            (_, Role::Admin) | (None, Role::Service) => Ok(()),
            (Some(own), _) if own == account => Ok(()),
            (Some(own), _) => Err(ApiError::Forbidden(format!(
                "this key belongs to account '{own}' and cannot {verb} account '{account}'"
            ))),
            (None, Role::Reader) => Err(ApiError::Forbidden(format!(
                "this reader key is bound to no account and cannot {verb} account '{account}'"
            ))),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        // Two keys in one request: which one counts would be a guess.
        if parts.headers.get_all(AUTHORIZATION).iter().nth(1).is_some() {
            return Err(ApiError::Unauthorized(
                "more than one Authorization header; send exactly one, `Authorization: Bearer KEY`".into(),
            ));
        }
        let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::Unauthorized(
                "missing Authorization header; send `Authorization: Bearer KEY` (create a key with `tally keys create --role service`)".into(),
            )
        })?;
        // The scheme name is case-insensitive (RFC 7235), and any blank may
        // follow it.
        let presented = header
            .to_str()
            .ok()
            .and_then(|h| h.split_once([' ', '\t']))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::Unauthorized("the Authorization header must be `Bearer KEY`".into()))?;
        let hash = KeySecret::from_presented(presented).hash();
        if state.admin_key_hash.as_deref() == Some(hash.as_str()) {
            return Ok(Caller {
                role: Role::Admin,
                account: None,
            });
        }
        if let Some(caller) = state.keys.get(&hash) {
            return Ok(caller);
        }
        // Stamped before the lookup: a revocation committing during it is
        // then honoured within the TTL, never later.
        let looked_up = Instant::now();
        match state.store.api_key_by_hash(&hash).await? {
            Some(key) => {
                let caller = Caller {
                    role: key.role,
                    account: key.account,
                };
                state.keys.put(hash, looked_up, caller.clone());
                Ok(caller)
            }
            None => Err(ApiError::Unauthorized(
                "unknown or revoked API key; check the key you send, or have an admin create one \
                 (`tally keys create --role service`)"
                    .into(),
            )),
        }
    }
}

/// A caller whose key may write: post entries, check and consume quota
/// (admin or service). As an extractor it answers 403 from the headers, so a
/// reader's body is never read.
#[derive(Debug, Clone)]
pub struct Writer(pub Caller);

/// A caller with an admin key; as an extractor, 403 from the headers alone.
#[derive(Debug, Clone)]
pub struct Admin(pub Caller);

/// The caller of `parts`, if its key has one of `roles`; the refusal names
/// the request (`POST /v1/entries`).
async fn caller_with_role(parts: &mut Parts, state: &AppState, roles: &[Role]) -> Result<Caller, ApiError> {
    let caller = Caller::from_request_parts(parts, state).await?;
    caller.require(roles, &format!("{} {}", parts.method, parts.uri.path()))?;
    Ok(caller)
}

impl FromRequestParts<AppState> for Writer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        caller_with_role(parts, state, &[Role::Admin, Role::Service])
            .await
            .map(Writer)
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        caller_with_role(parts, state, &[Role::Admin]).await.map(Admin)
    }
}

/// How long a key, once found, is trusted without asking the database again.
/// A revocation (by `tally keys revoke`, in any process) therefore applies to
/// every server within this long. Unknown and revoked keys are never cached:
/// a new key works at once.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(2);

/// Keys recently found in the database, by hash: saves a round trip per
/// request (a quota check is otherwise one third key lookup).
#[derive(Debug, Default)]
pub struct KeyCache {
    map: Mutex<HashMap<String, (Instant, Caller)>>,
}

impl KeyCache {
    /// Keys kept at most; past it, expired ones go, then all.
    const CAPACITY: usize = 10_000;

    fn get(&self, hash: &str) -> Option<Caller> {
        let map = self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(hash)
            .filter(|(found, _)| found.elapsed() < KEY_CACHE_TTL)
            .map(|(_, caller)| caller.clone())
    }

    fn put(&self, hash: String, looked_up: Instant, caller: Caller) {
        let mut map = self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= Self::CAPACITY {
            map.retain(|_, (found, _)| found.elapsed() < KEY_CACHE_TTL);
            if map.len() >= Self::CAPACITY {
                map.clear();
            }
        }
        map.insert(hash, (looked_up, caller));
    }
}
