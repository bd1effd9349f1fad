//! `tally accounts …`, `tally check`, `tally usage`: the account and quota
//! reads and admin writes, straight on the database.

use std::process::ExitCode;
use std::sync::Arc;

use chrono::{SubsecRound, Utc};

use crate::app::Settings;
use crate::domain::catalog::{Enforcement, Window};
use crate::domain::entry::{parse_bound, parse_instant_or_date, parse_setting_instant};
use crate::domain::plan::{Override, parse_limit};
use crate::domain::{AccountId, Amount, Catalog, ResourceName};
use crate::usage::account::account_view;
use crate::usage::features::feature_at;
use crate::usage::quota::{QuotaStatus, Quotas, check_amount};

/// `tally accounts …`
#[derive(Debug, clap::Subcommand)]
pub enum AccountsCommand {
    /// Plan in force, plan history and overrides, as JSON.
    Show {
        /// Account id.
        account: String,
    },
    /// Put an account on a plan from an instant (now by default); history is kept.
    SetPlan {
        /// Account id.
        account: String,
        /// Plan name (see `tally plans show`).
        plan: String,
        /// RFC 3339 instant the plan applies from.
        #[arg(long)]
        effective_at: Option<String>,
    },
    /// Set a per-account limit that beats the plan's.
    Override {
        /// Account id.
        account: String,
        /// Resource name.
        resource: String,
        /// The limit, or "unlimited".
        #[arg(long)]
        limit: String,
        /// hard or soft (default: the plan's).
        #[arg(long)]
        enforcement: Option<String>,
        /// day, month or total (default: the plan's).
        #[arg(long)]
        window: Option<String>,
        /// RFC 3339 instant it stops applying.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Remove an override.
    ClearOverride {
        /// Account id.
        account: String,
        /// Resource name.
        resource: String,
    },
}

/// Arguments of `tally check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Account id.
    account: String,
    /// Resource name.
    resource: String,
    /// Amount to check (default 1); a negative one is refused with a message.
    #[arg(allow_hyphen_values = true)]
    amount: Option<String>,
    /// RFC 3339 instant, or a date for its UTC midnight (default now).
    #[arg(long)]
    at: Option<String>,
}

/// Arguments of `tally usage`.
#[derive(Debug, clap::Args)]
pub struct UsageArgs {
    /// Account id.
    account: String,
    /// RFC 3339 instant, or a date for its UTC midnight (default now).
    #[arg(long)]
    at: Option<String>,
}

/// Arguments of `tally feature`.
#[derive(Debug, clap::Args)]
pub struct FeatureArgs {
    /// Account id.
    account: String,
    /// Feature name (see `tally plans show`).
    feature: String,
    /// RFC 3339 instant, or a date for its UTC midnight (default now).
    #[arg(long)]
    at: Option<String>,
}

fn account(raw: &str) -> anyhow::Result<AccountId> {
    AccountId::parse(raw).map_err(anyhow::Error::msg)
}

/// `--effective-at` / `--expires-at`: RFC 3339, as the HTTP bodies take
/// them, refused out of range in the flag's words with `instead` (what to
/// give); now by default.
fn timestamp(flag: &str, raw: Option<&str>, instead: &str) -> anyhow::Result<chrono::DateTime<Utc>> {
    raw.map_or_else(
        || Ok(Utc::now().trunc_subsecs(6)),
        |t| parse_setting_instant(flag, t, instead).map_err(anyhow::Error::msg),
    )
}

/// `--at`: as the HTTP reads take it (RFC 3339 or a plain date), now by default.
fn instant(raw: Option<&str>) -> anyhow::Result<chrono::DateTime<Utc>> {
    raw.map_or_else(
        || Ok(Utc::now().trunc_subsecs(6)),
        |t| parse_instant_or_date(t).map_err(|m| anyhow::anyhow!("--at: {m}")),
    )
}

/// Runs an accounts subcommand.
pub async fn run(settings: &Settings, command: AccountsCommand) -> anyhow::Result<ExitCode> {
    // Showing and clearing read what is there. Setting a plan or an override
    // may be a new database's first setup, before it is served: their input
    // is checked against the catalog before the database is opened, so
    // refused input leaves no new SQLite file behind.
    match command {
        AccountsCommand::Show { account: raw } => {
            let account = account(&raw)?;
            let (store, catalog) = settings.open_existing_store().await?;
            let view = account_view(store.as_ref(), &catalog, account, Utc::now()).await?;
            outln!("{}", serde_json::to_string_pretty(&view)?)?;
        }
        AccountsCommand::SetPlan {
            account: raw,
            plan,
            effective_at,
        } => {
            let account = account(&raw)?;
            let catalog = Arc::new(settings.load_catalog()?);
            if !catalog.plans.contains_key(&plan) {
                anyhow::bail!("plan '{plan}' is not in the catalog; plans: {}", catalog.plan_names());
            }
            let effective_at = timestamp(
                "--effective-at",
                effective_at.as_deref(),
                "give the instant the plan takes effect, or leave --effective-at out to assign it from now",
            )?;
            let store = settings.open_store_with(catalog.clone()).await?;
            let assignment = store.assign_plan(&account, &plan, effective_at).await?;
            let from = assignment
                .effective_at
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
            // Said as it stands now: a back-dated assignment is overtaken by
            // any that takes effect after it.
            let now = Utc::now();
            let in_force = account_view(store.as_ref(), &catalog, account.clone(), now).await?.plan;
            if assignment.effective_at > now {
                stderr_line!("account {account} is on plan {plan} from {from}; until then it is on {in_force}");
            } else if in_force == plan {
                stderr_line!("account {account} is on plan {plan} from {from}");
            } else {
                stderr_line!(
                    "account {account} is on plan {plan} from {from}, but an assignment that takes effect later \
                     puts it on {in_force} now; `tally accounts show {account}` lists its plan history"
                );
            }
        }
        AccountsCommand::Override {
            account: raw,
            resource,
            limit,
            enforcement,
            window,
            expires_at,
        } => {
            let account = account(&raw)?;
            let catalog = settings.load_catalog()?;
            let (resource, decimals) = catalog
                .resource(&resource)
                .map(|(name, spec)| (name.clone(), spec.decimals))?;
            let mut value = Override {
                resource: resource.clone(),
                // The flag takes `unlimited` for no limit (the body's null too).
                limit: parse_limit(&limit, decimals)
                    .map_err(|e| anyhow::anyhow!(e.to_string().replace("null / \"unlimited\"", "unlimited")))?,
                enforcement: enforcement
                    .map(|e| {
                        Enforcement::parse(&e).ok_or_else(|| anyhow::anyhow!("enforcement {e:?} is not hard or soft"))
                    })
                    .transpose()?,
                window: window
                    .map(|w| {
                        Window::parse(&w).ok_or_else(|| anyhow::anyhow!("window {w:?} is not day, month or total"))
                    })
                    .transpose()?,
                expires_at: expires_at
                    .as_deref()
                    .map(|t| {
                        timestamp(
                            "--expires-at",
                            Some(t),
                            "for an override that does not expire, leave --expires-at out",
                        )
                    })
                    .transpose()?,
                updated_at: Utc::now().trunc_subsecs(6),
            };
            let check_expiry = |value: &Override| {
                Override::check_expiry(
                    value.expires_at,
                    value.updated_at,
                    &format!("run tally accounts clear-override {account} {resource}"),
                )
                .map_err(|m| anyhow::anyhow!("--expires-at: {}", m.replacen("expires_at ", "", 1)))
            };
            check_expiry(&value)?;
            let store = settings.open_store_with(Arc::new(catalog)).await?;
            // Set at the instant it is written, as over HTTP, not before the
            // open (a PostgreSQL connection, a migration) took its time.
            value.updated_at = Utc::now().trunc_subsecs(6);
            check_expiry(&value)?;
            store.put_override(&account, &value).await?;
            outln!("{}", serde_json::to_string_pretty(&value)?)?;
        }
        AccountsCommand::ClearOverride { account: raw, resource } => {
            let account = account(&raw)?;
            let (store, catalog) = settings.open_existing_store().await?;
            let removed_at = Utc::now().trunc_subsecs(6);
            let resource = match catalog.resource(&resource) {
                Ok((known, _)) => known.clone(),
                // As over HTTP: an override on a resource dropped from the
                // catalog can still be removed.
                Err(unknown) => match ResourceName::parse(&resource) {
                    Ok(dropped) if store.delete_override(&account, &dropped, removed_at).await? => {
                        stderr_line!("removed the override of account {account} on {dropped} (not in the catalog)");
                        return Ok(ExitCode::SUCCESS);
                    }
                    _ => return Err(unknown.into()),
                },
            };
            if !store.delete_override(&account, &resource, removed_at).await? {
                anyhow::bail!("account '{account}' has no override for {resource}");
            }
            stderr_line!("removed the override of account {account} on {resource}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tally check`: the quota check, as JSON; exit 0 when allowed, 1 when not,
/// 2 on any error (bad input, an unreachable database), so that a script can
/// tell "refused" from "could not ask".
pub async fn check(settings: &Settings, args: CheckArgs) -> anyhow::Result<ExitCode> {
    match check_status(settings, args).await {
        Ok((status, catalog)) => {
            warn_if_plan_missing(&catalog, &status.account, &status.plan);
            outln!("{}", serde_json::to_string_pretty(&status)?)?;
            Ok(if status.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Err(error) => {
            stderr_line!("error: {}", crate::telemetry::cause_chain(error.as_ref()));
            Ok(ExitCode::from(2))
        }
    }
}

/// `tally feature`: the feature as `GET /v1/accounts/{account}/features/{feature}`
/// answers it; exit 0 when allowed, 1 when not, 2 on an error (an unknown
/// feature included), as `tally check`.
pub async fn feature(settings: &Settings, args: FeatureArgs) -> anyhow::Result<ExitCode> {
    let answer = async {
        let (store, catalog) = settings.open_existing_store().await?;
        let account = account(&args.account)?;
        // No period is read at a feature's instant: December 9999 is fine,
        // as over HTTP (review AT).
        let at = match args.at.as_deref() {
            None => Utc::now().trunc_subsecs(6),
            Some(raw) => parse_bound(raw).map_err(|m| anyhow::anyhow!("--at: {m}"))?,
        };
        let history = store.plan_history(&account).await?;
        feature_at(&catalog, &history, &args.feature, at).map_err(anyhow::Error::msg)
    };
    match answer.await {
        Ok(view) => {
            outln!("{}", serde_json::to_string_pretty(&view)?)?;
            Ok(if view.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Err(error) => {
            stderr_line!("error: {}", crate::telemetry::cause_chain(error.as_ref()));
            Ok(ExitCode::from(2))
        }
    }
}

/// Says on stderr when an account's plan is missing from the catalog: its
/// answer is then "unlimited" for every resource, which is rarely meant.
fn warn_if_plan_missing(catalog: &Catalog, account: &str, plan: &str) {
    if !catalog.plans.contains_key(plan) {
        stderr_line!(
            "warning: account {account} is on plan '{plan}', which the catalog does not have: nothing limits it \
             (move it with tally accounts set-plan {account} PLAN; known plans: {})",
            catalog.plan_names()
        );
    }
}

/// The check `tally check` prints, and the catalog it was made with.
async fn check_status(settings: &Settings, args: CheckArgs) -> anyhow::Result<(QuotaStatus, Arc<Catalog>)> {
    let (store, catalog) = settings.open_existing_store().await?;
    let account = account(&args.account)?;
    let (resource, spec) = catalog.resource(&args.resource)?;
    let amount = match args.amount.as_deref() {
        None => Amount::one(spec.decimals),
        Some(text) => check_amount(text, resource, spec.decimals).map_err(anyhow::Error::msg)?,
    };
    let quotas = Quotas {
        store: store.as_ref(),
        catalog: &catalog,
    };
    let status = quotas
        .check(&account, resource, amount, instant(args.at.as_deref())?)
        .await?;
    Ok((status, catalog))
}

/// `tally usage`: where an account stands, as JSON.
pub async fn usage(settings: &Settings, args: UsageArgs) -> anyhow::Result<ExitCode> {
    let (store, catalog) = settings.open_existing_store().await?;
    let quotas = Quotas {
        store: store.as_ref(),
        catalog: &catalog,
    };
    let report = quotas
        .usage(&account(&args.account)?, instant(args.at.as_deref())?)
        .await?;
    warn_if_plan_missing(&catalog, &report.account, &report.plan);
    outln!("{}", serde_json::to_string_pretty(&report)?)?;
    Ok(ExitCode::SUCCESS)
}
