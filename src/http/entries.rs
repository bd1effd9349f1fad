//! The ledger over HTTP: post entries, reverse one, list an account's rows.

use std::collections::HashMap;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::AppState;
use super::auth::{Caller, Writer};
use super::error::ApiError;
use super::extract::{Body, NoQuery, Path, QueryParams, malformed_json, malformed_json_in, parse_json, require_object};
use super::params;
use crate::domain::entry::{BACKFILL, EntryRules, FieldError, refuse_nul, validate_batch};
use crate::domain::{
    AccountId, Entry, EntryFilter, EntryInput, IdempotencyKey, InsertOutcome, InsertStatus, ResourceName, Role,
};
use crate::store::{StoreError, reversal_of, too_late_unless_recorded};

/// The most entries one request may carry.
pub const MAX_BATCH: usize = 10_000;
/// The most rows one listing returns.
pub const MAX_PAGE: u32 = 1_000;
/// Rows per listing when `limit` is not given.
pub const DEFAULT_PAGE: u32 = 100;

/// The ledger's routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/entries", post(post_entries))
        .route("/v1/entries/{id}/reversal", post(reverse_entry))
        .route("/v1/accounts/{account}/entries", get(list_entries))
}

#[derive(Serialize)]
struct PostEntriesResponse {
    created: usize,
    duplicates: usize,
    entries: Vec<InsertOutcome>,
}

/// A batch body, `{"entries": […]}` and nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    entries: BoundedEntries,
}

/// The entries of a batch, at most [`MAX_BATCH`]: past that, reading stops
/// at once with [`TOO_MANY_ENTRIES`]. A 10 MiB body of `{}` is 3.5 million
/// entries, which parsed whole took some 600 MB before the count was known.
struct BoundedEntries(Vec<EntryInput>);

/// The error a [`BoundedEntries`] stops with, recognised by [`is_too_many`].
const TOO_MANY_ENTRIES: &str = "more entries than one request may hold";

impl<'de> Deserialize<'de> for BoundedEntries {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = BoundedEntries;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of entries")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(ObjectEntry(entry)) = seq.next_element::<ObjectEntry>()? {
                    if entries.len() == MAX_BATCH {
                        return Err(serde::de::Error::custom(TOO_MANY_ENTRIES));
                    }
                    entries.push(entry);
                }
                Ok(BoundedEntries(entries))
            }
        }
        deserializer.deserialize_seq(Entries)
    }
}

/// One entry of a batch, read from a JSON object only. serde's derived
/// structs also take an array of their fields in declaration order, which
/// would slip past field names and `deny_unknown_fields`; asking for a map
/// refuses that in the same single pass.
struct ObjectEntry(EntryInput);

impl<'de> Deserialize<'de> for ObjectEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = ObjectEntry;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an entry object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                EntryInput::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(ObjectEntry)
            }
        }
        deserializer.deserialize_map(Object)
    }
}

/// Whether `e` is a [`BoundedEntries`] refusing a list past [`MAX_BATCH`].
fn is_too_many(e: &serde_json::Error) -> bool {
    e.to_string().starts_with(TOO_MANY_ENTRIES)
}

/// The 413 for a batch past [`MAX_BATCH`].
fn too_many_entries() -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "more than {MAX_BATCH} entries in one request; the limit is {MAX_BATCH}: split the batch"
    ))
}

/// How a body gave its entries; a message about a batch names the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyShape {
    /// One entry as the whole body.
    One,
    /// `{"entries": […]}`, of any length.
    Batch,
}

/// Splits a body into its entries: `{"entries": […]}` or one entry.
///
/// A well-formed batch is parsed in one pass. Anything else (one entry, or a
/// malformed body) takes the general path: the body is first read as a map of
/// borrowed raw values, which tells the shapes apart and words the errors.
/// Amounts stay as written either way (`RawValue`).
fn entries_of(bytes: &[u8]) -> Result<(Vec<EntryInput>, BodyShape), ApiError> {
    // `BatchBody` too would read an array (`[[…]]`) as its one field.
    require_object(bytes)?;
    // Kept for a batch that stays malformed below: its line and column are
    // in the whole body, where the list's own parse would count from `[`.
    let batch_error = match serde_json::from_slice::<BatchBody>(bytes) {
        Ok(batch) => return Ok((batch.entries.0, BodyShape::Batch)),
        Err(e) if is_too_many(&e) => return Err(too_many_entries()),
        Err(e) => e,
    };
    // Owned keys: a key written with an escape (`"acc\u006funt"`) cannot be
    // borrowed from the body.
    let Fields(listed) = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::MalformedBody(format!("the body is not a JSON object: {e}")))?;
    let mut fields: HashMap<String, &RawValue> = HashMap::with_capacity(listed.len());
    for (name, value) in listed {
        // A map keeps the last of two: `{"entries":[…bad…],"entries":[…]}`
        // would post the second list and drop the first unread.
        if fields.contains_key(&name) {
            return Err(ApiError::MalformedBody(format!(
                "the body names {name:?} twice; send each field once"
            )));
        }
        fields.insert(name, value);
    }
    match fields.get("entries") {
        Some(list) if fields.len() == 1 => match serde_json::from_slice::<BoundedEntries>(list.get().as_bytes()) {
            Ok(entries) => Ok((entries.0, BodyShape::Batch)),
            Err(e) if is_too_many(&e) => Err(too_many_entries()),
            Err(_) => Err(malformed_batch(list, batch_error)),
        },
        Some(_) => {
            let mut others: Vec<&str> = fields.keys().map(String::as_str).filter(|k| *k != "entries").collect();
            others.sort_unstable();
            Err(ApiError::MalformedBody(format!(
                "a batch body holds \"entries\" and nothing else, but it also has {others:?}; \
                 send {{\"entries\": […]}} alone, or one entry without \"entries\""
            )))
        }
        None => parse_json(bytes).map(|one| (vec![one], BodyShape::One)),
    }
}

/// A JSON object's fields in the order written, repeats kept (serde_json's
/// maps keep only the last of a repeated name).
struct Fields<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Listed;
        impl<'de> serde::de::Visitor<'de> for Listed {
            type Value = Fields<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::new();
                while let Some(field) = map.next_entry::<String, &'de RawValue>()? {
                    fields.push(field);
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(Listed)
    }
}

/// The 400 for a batch whose list does not read as entries: serde's words
/// and position, and which entry is at fault when one is (a batch of
/// thousands is otherwise hard to search).
fn malformed_batch(list: &RawValue, error: serde_json::Error) -> ApiError {
    let culprit = serde_json::from_str::<Vec<&RawValue>>(list.get())
        .ok()
        .and_then(|items| {
            items
                .iter()
                .position(|item| serde_json::from_str::<EntryInput>(item.get()).is_err())
        });
    match culprit {
        Some(index) => malformed_json_in(&format!("entries[{index}]"), error),
        None => malformed_json(error),
    }
}

async fn post_entries(
    State(state): State<AppState>,
    Writer(caller): Writer,
    _: NoQuery,
    Body(bytes): Body,
) -> Result<Json<PostEntriesResponse>, ApiError> {
    let (inputs, shape) = entries_of(&bytes)?;
    if inputs.is_empty() {
        return Err(ApiError::invalid("entries", "entries must hold 1 to 10000 entries"));
    }
    // A key bound to one account is refused before anything else is said
    // about another account's entries (validation would answer first). An
    // account that does not parse fails validation, so every entry that
    // passes it has been checked here.
    for account in inputs.iter().filter_map(|i| i.account.as_deref()) {
        if let Ok(account) = AccountId::parse(account) {
            caller.require_write(&account)?;
        }
    }
    let refuse = |errors| match shape {
        BodyShape::One => ApiError::from_field_errors(errors),
        BodyShape::Batch => ApiError::from_batch_errors(errors),
    };
    let batch = validate_batch(inputs, state.entry_rules()).map_err(refuse)?;
    let too_late = too_late_unless_recorded(state.store.as_ref(), &batch.entries, batch.too_late).await?;
    if !too_late.is_empty() {
        return Err(refuse(too_late));
    }
    let entries = batch.entries;
    let outcomes = state
        .store
        .insert_entries(&entries)
        .await
        .map_err(|e| match (shape, e) {
            // One entry has no position to name ("entry 0" reads as an id);
            // details.index still says 0.
            (BodyShape::One, StoreError::IdempotencyConflict { message, .. }) => ApiError::Conflict {
                code: "idempotency_conflict",
                message,
                details: serde_json::json!({ "index": 0 }),
            },
            (_, e) => e.into(),
        })?;
    let created = outcomes.iter().filter(|o| o.status == InsertStatus::Created).count();
    state.metrics.entries_ingested(created as u64);
    tracing::debug!(
        created,
        total = outcomes.len(),
        "posted {created} of {} entries",
        outcomes.len()
    );
    Ok(Json(PostEntriesResponse {
        created,
        duplicates: outcomes.len() - created,
        entries: outcomes,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReversalRequest {
    idempotency_key: Option<String>,
    reason: Option<String>,
}

#[derive(Serialize)]
struct ReversalResponse {
    #[serde(flatten)]
    entry: Entry,
    status: InsertStatus,
}

async fn reverse_entry(
    State(state): State<AppState>,
    Writer(caller): Writer,
    _: NoQuery,
    Path(id): Path<String>,
    Body(bytes): Body,
) -> Result<Json<ReversalResponse>, ApiError> {
    let request: ReversalRequest = parse_json(&bytes)?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::NotFound(format!("entry {id:?} does not exist; entry ids are integers")))?;
    let key = match request.idempotency_key.as_deref() {
        None => return Err(ApiError::missing("idempotency_key", "idempotency_key is required")),
        Some(raw) => IdempotencyKey::parse(raw).map_err(|m| ApiError::invalid("idempotency_key", m))?,
    };
    if let Some(reason) = &request.reason {
        if reason.chars().count() > 1000 {
            return Err(ApiError::invalid("reason", "reason must be at most 1000 characters"));
        }
        refuse_nul("reason", reason).map_err(|m| ApiError::invalid("reason", m))?;
    }
    let original = state.store.entry(id).await?;
    // A key bound to another account gets the answer for a missing entry:
    // a 403 would confirm the id and name the account it belongs to.
    if caller.require_write(&original.account).is_err() {
        return Err(StoreError::entry_not_found(id).into());
    }
    let reversal = reversal_of(&original, key, request.reason.as_deref())?;
    // A reversal lands in the original's buckets: past the horizon those
    // periods are closed (reported, invoiced), as they are to a service's new
    // entries. An operator may still correct one, deliberately, as admin.
    // A retry of a reversal made while the entry was within the horizon is
    // answered as any retry (review AP).
    if original.occurred_at < state.clock.now() - state.late_horizon
        && caller.role != Role::Admin
        && !state
            .store
            .holds_keys(&[(&reversal.account, &reversal.idempotency_key)])
            .await?[0]
    {
        return Err(ApiError::from_field_errors(vec![FieldError {
            index: 0,
            field: "id",
            code: "too_late",
            message: format!(
                "entry {id} occurred at {}, older than the late-arrival horizon of {} days, and its reversal \
                 would change that closed period; an admin key can reverse it",
                original
                    .occurred_at
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                state.late_horizon.num_days()
            ),
        }]));
    }
    let outcome = state.store.insert_entry(&reversal).await?;
    if outcome.status == InsertStatus::Created {
        state.metrics.entries_ingested(1);
    }
    tracing::info!(
        entry.id = id,
        reversal.id = outcome.id,
        "reversed entry {id} with entry {}",
        outcome.id
    );
    let entry = state.store.entry(outcome.id).await?;
    Ok(Json(ReversalResponse {
        entry,
        status: outcome.status,
    }))
}

#[derive(Serialize)]
struct EntryPage {
    entries: Vec<Entry>,
    next_after_id: Option<i64>,
}

async fn list_entries(
    State(state): State<AppState>,
    caller: Caller,
    Path(account): Path<String>,
    QueryParams(query): QueryParams,
) -> Result<Json<EntryPage>, ApiError> {
    let account = params::account(&account)?;
    caller.require_read(&account)?;
    let resource = match query.get("resource") {
        Some(raw) => Some(params::readable_resource(&state, Some(&account), raw).await?),
        None => None,
    };
    let filter = entry_filter(account, resource, &query)?;
    let entries = state.store.list_entries(&filter).await?;
    let next_after_id = if entries.len() == filter.limit as usize {
        entries.last().map(|e| e.id)
    } else {
        None
    };
    Ok(Json(EntryPage { entries, next_after_id }))
}

fn entry_filter(
    account: AccountId,
    resource: Option<ResourceName>,
    query: &HashMap<String, String>,
) -> Result<EntryFilter, ApiError> {
    params::reject_unknown(query, &["from", "to", "resource", "after_id", "limit"])?;
    let from = query.get("from").map(|v| params::range_bound("from", v)).transpose()?;
    let to = query.get("to").map(|v| params::range_bound("to", v)).transpose()?;
    if let (Some(from), Some(to)) = (from, to)
        && from > to
    {
        let write = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        return Err(ApiError::invalid(
            "from",
            format!(
                "from ({}) is after to ({}); give a from at or before the to",
                write(from),
                write(to)
            ),
        ));
    }
    let after_id = query
        .get("after_id")
        .map(|v| {
            v.parse::<i64>().map_err(|e| {
                let why = match e.kind() {
                    std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => {
                        "is out of range (ids are 64-bit integers)"
                    }
                    _ => "is not an integer",
                };
                ApiError::invalid(
                    "after_id",
                    format!("after_id {v:?} {why}; give the next_after_id of the page before"),
                )
            })
        })
        .transpose()?;
    let limit = match query.get("limit") {
        None => DEFAULT_PAGE,
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(
                    "limit",
                    format!("limit {v:?} must be an integer from 1 to {MAX_PAGE}"),
                ));
            }
        },
    };
    Ok(EntryFilter {
        account: Some(account),
        resource,
        from,
        to,
        after_id,
        limit,
    })
}

impl AppState {
    /// The validation rules for entries posted now.
    pub fn entry_rules(&self) -> EntryRules<'_> {
        EntryRules {
            catalog: &self.catalog,
            now: self.clock.now(),
            late_horizon: self.late_horizon,
            allow_late: false,
            too_late: BACKFILL,
        }
    }
}
