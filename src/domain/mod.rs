//! Validated domain types. Each has a `parse` constructor; once parsed, the
//! rest of the code never re-checks them.

pub mod account;
pub mod amount;
pub mod api_key;
pub mod catalog;
pub mod entry;
pub mod idempotency;
pub mod period;
pub mod plan;
pub mod resource;

pub use account::AccountId;
pub use amount::{Amount, AmountError};
pub use api_key::{ApiKey, KeySecret, Role};
pub use catalog::Catalog;
pub use entry::{Entry, EntryFilter, EntryInput, EntryRules, FieldError, InsertOutcome, InsertStatus, NewEntry};
pub use idempotency::IdempotencyKey;
pub use resource::ResourceName;

/// `text` as an error message shows it: whole up to 64 characters, else its
/// start and how long it was.
pub(crate) fn shown(text: &str) -> String {
    match text.char_indices().nth(64) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
    }
}
