//! `tally keys`: create, list and revoke API keys.

use std::process::ExitCode;

use crate::app::{Settings, new_key};
use crate::domain::{AccountId, Role};

/// `tally keys …`
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints the plaintext as the only line on stdout.
    Create {
        /// What the key may do.
        #[arg(long, value_enum)]
        role: Role,
        /// Bind the key to one account (required for readers).
        #[arg(long)]
        account: Option<String>,
        /// A name for people.
        #[arg(long)]
        name: Option<String>,
    },
    /// List keys (never their plaintext).
    List,
    /// Revoke a key by id.
    Revoke {
        /// The id `tally keys list` shows.
        id: i64,
    },
}

/// Runs a keys subcommand.
pub async fn run(settings: &Settings, command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Create { role, account, name } => {
            // Checked before the database is opened: a refused key leaves no
            // new SQLite file behind. Creating a key may be a new database's
            // first step, so it may create one.
            let account = account
                .map(|a| AccountId::parse(&a).map_err(anyhow::Error::msg))
                .transpose()?;
            let (secret, new) = new_key(role, account, name)?;
            let (store, _) = settings.open_store().await?;
            store.create_api_key(&new).await?;
            outln!("{}", secret.expose())?;
        }
        // Listing and revoking read what is there.
        KeysCommand::List => {
            let (store, _) = settings.open_existing_store().await?;
            let time = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let mut rows = vec![["id", "role", "prefix", "account", "name", "created", "revoked"].map(String::from)];
            for key in store.list_api_keys().await? {
                rows.push([
                    key.id.to_string(),
                    key.role.as_str().to_owned(),
                    key.prefix,
                    key.account.map_or_else(|| "-".to_owned(), |a| a.as_str().to_owned()),
                    // Escaped: a name stored before control characters
                    // were refused (or by hand) must not split its row.
                    key.name.map_or_else(
                        || "-".to_owned(),
                        |name| {
                            if name.chars().any(char::is_control) {
                                name.escape_debug().to_string()
                            } else {
                                name
                            }
                        },
                    ),
                    time(key.created_at),
                    key.revoked_at.map_or_else(|| "-".to_owned(), time),
                ]);
            }
            // Each column as wide as its widest cell, so long account names
            // and names with spaces keep the columns after them in line.
            let mut widths = [0; 7];
            for row in &rows {
                for (width, cell) in widths.iter_mut().zip(row) {
                    *width = (*width).max(cell.chars().count());
                }
            }
            for row in &rows {
                let line = row
                    .iter()
                    .zip(widths)
                    .enumerate()
                    .map(|(column, (cell, width))| match column {
                        0 => format!("{cell:>width$}"),
                        6 => cell.clone(),
                        _ => format!("{cell:<width$}"),
                    })
                    .collect::<Vec<_>>()
                    .join("  ");
                outln!("{line}")?;
            }
        }
        KeysCommand::Revoke { id } => {
            // Revoking is idempotent (the first revocation's time is kept);
            // say so when it was done before, rather than claim it now.
            let (store, _) = settings.open_existing_store().await?;
            let asked = chrono::Utc::now();
            let key = store.revoke_api_key(id).await?;
            match key.revoked_at {
                Some(when) if when < asked - chrono::Duration::seconds(1) => stderr_line!(
                    "key {} ({}) was already revoked at {}; nothing changed",
                    key.id,
                    key.prefix,
                    when.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                _ => stderr_line!("revoked key {} ({})", key.id, key.prefix),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
