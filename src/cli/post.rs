//! `tally post`: one entry from the command line.

use std::process::ExitCode;

use chrono::Utc;
use rand::RngCore;

use crate::app::Settings;
use crate::domain::EntryInput;
use crate::domain::entry::{BACKFILL, EntryRules, FieldError, validate_batch};
use crate::store::{StoreError, too_late_unless_recorded};

/// Arguments of `tally post`.
#[derive(Debug, clap::Args)]
pub struct PostArgs {
    /// Account id.
    account: String,
    /// Resource name (see `tally plans show`).
    resource: String,
    /// Signed amount, e.g. 1500 or -0.25.
    #[arg(allow_hyphen_values = true)]
    amount: String,
    /// When it happened (RFC 3339); now by default.
    #[arg(long)]
    at: Option<String>,
    /// Idempotency key; a random one by default.
    #[arg(long)]
    key: Option<String>,
    /// Who sent it.
    #[arg(long, default_value = "cli")]
    source: String,
}

/// Validates and appends the entry, printing its id and status.
pub async fn run(settings: &Settings, args: PostArgs) -> anyhow::Result<ExitCode> {
    // The entry is checked before the database is opened: refused, it
    // leaves no new SQLite file behind.
    let catalog = std::sync::Arc::new(settings.load_catalog()?);
    let key = args.key.unwrap_or_else(|| {
        let mut bytes = [0u8; 12];
        rand::rng().fill_bytes(&mut bytes);
        format!("cli-{}", hex::encode(bytes))
    });
    let input = EntryInput {
        account: Some(args.account),
        resource: Some(args.resource),
        amount: Some(serde_json::value::to_raw_value(&args.amount)?),
        idempotency_key: Some(key),
        occurred_at: args.at,
        source: Some(args.source),
        metadata: None,
    };
    let rules = EntryRules {
        catalog: &catalog,
        now: Utc::now(),
        late_horizon: chrono::Duration::days(settings.late_horizon_days),
        allow_late: false,
        too_late: BACKFILL,
    };
    let refuse = |errors: Vec<FieldError>| {
        for e in errors {
            stderr_line!("error: {}", in_the_cli_words(e.field, &e.message));
        }
        Ok(ExitCode::from(2))
    };
    let batch = match validate_batch(vec![input], rules) {
        Ok(batch) => batch,
        Err(errors) => return refuse(errors),
    };
    let store = settings.open_store_with(catalog).await?;
    // A retry with the same --key is answered as one, however old --at has
    // grown since the first run.
    let too_late = too_late_unless_recorded(store.as_ref(), &batch.entries, batch.too_late).await?;
    if !too_late.is_empty() {
        return refuse(too_late);
    }
    let entries = batch.entries;
    // One input validates to one entry.
    let outcome = store.insert_entry(&entries[0]).await.map_err(|e| match e {
        // Whether a write cut off this way landed is not known: the key
        // makes the retry safe, so say it, generated or given (review AQ).
        StoreError::Unavailable(_) | StoreError::Busy(_) | StoreError::Contended(_) => {
            let key = entries[0].idempotency_key.as_str();
            anyhow::Error::new(e).context(format!(
                "the entry may not be recorded: run the same command again with --key {key} (the same key records \
                 once)"
            ))
        }
        other => other.into(),
    })?;
    outln!(
        "{} entry {} (idempotency_key {})",
        match outcome.status {
            crate::domain::InsertStatus::Created => "created",
            crate::domain::InsertStatus::Duplicate => "duplicate of",
        },
        outcome.id,
        outcome.idempotency_key
    )?;
    Ok(ExitCode::SUCCESS)
}

/// A field's problem in the words of the argument that gave it (`--at`, not
/// `occurred_at`), named once.
fn in_the_cli_words(field: &str, message: &str) -> String {
    let argument = match field {
        "occurred_at" => "--at",
        "idempotency_key" => "--key",
        "source" => "--source",
        // The positional arguments read well by their own names.
        other => other,
    };
    let said = match message.strip_prefix(field) {
        // "occurred_at 2026-09-01T00:00:00Z is older than …"
        Some(rest) if rest.starts_with(' ') => format!("{argument}{rest}"),
        _ => format!("{argument}: {message}"),
    };
    // The advice names the field too ("leave occurred_at out"), and the
    // clock it was judged by, which here is this machine's: there is no server.
    said.replace(&format!(" {field} "), &format!(" {argument} "))
        .replace("the server's", "this machine's")
}
