//! `tally keys`: create, list and revoke API keys.

use std::process::ExitCode;

use crate::app::{Settings, create_key};
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
    // Creating a key may be a new database's first step; listing and
    // revoking read what is there.
    let (store, _) = if matches!(command, KeysCommand::Create { .. }) {
        settings.open_store().await?
    } else {
        settings.open_existing_store().await?
    };
    match command {
        KeysCommand::Create { role, account, name } => {
            let account = account
                .map(|a| AccountId::parse(&a).map_err(anyhow::Error::msg))
                .transpose()?;
            let secret = create_key(store.as_ref(), role, account, name).await?;
            outln!("{}", secret.expose())?;
        }
        KeysCommand::List => {
            outln!(
                "{:>5}  {:<8} {:<14} {:<20} {:<20} {:<26} revoked",
                "id",
                "role",
                "prefix",
                "account",
                "name",
                "created"
            )?;
            for key in store.list_api_keys().await? {
                outln!(
                    "{:>5}  {:<8} {:<14} {:<20} {:<20} {:<26} {}",
                    key.id,
                    key.role.as_str(),
                    key.prefix,
                    key.account.as_ref().map_or("-", |a| a.as_str()),
                    key.name.as_deref().unwrap_or("-"),
                    key.created_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    key.revoked_at
                        .map_or("-".into(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                )?;
            }
        }
        KeysCommand::Revoke { id } => {
            // Revoking is idempotent (the first revocation's time is kept);
            // say so when it was done before, rather than claim it now.
            let asked = chrono::Utc::now();
            let key = store.revoke_api_key(id).await?;
            match key.revoked_at {
                Some(when) if when < asked - chrono::Duration::seconds(1) => eprintln!(
                    "key {} ({}) was already revoked at {}; nothing changed",
                    key.id,
                    key.prefix,
                    when.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                _ => eprintln!("revoked key {} ({})", key.id, key.prefix),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
