//! `tally export …`, `tally stats`, `tally top`.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chrono::NaiveDate;

use super::ReadScope;
use crate::app::Settings;
use crate::domain::AccountId;
use crate::domain::entry::parse_instant_or_date;
use crate::domain::period::{Granularity, parse_date, parse_month};
use crate::export::CsvOutput;
use crate::export::invoice::export_invoices;
use crate::export::ledger::{export_entries, export_totals};
use crate::store::ExportFilter;
use crate::usage::admin;

/// `tally export …`
#[derive(Debug, clap::Subcommand)]
pub enum ExportCommand {
    /// Ledger rows (re-importable with `tally import`).
    Entries(RangeArgs),
    /// Daily totals.
    Daily(RangeArgs),
    /// Monthly totals.
    Monthly(RangeArgs),
    /// Invoice preview for a month.
    Invoice(InvoiceArgs),
}

/// Options every export shares.
#[derive(Debug, clap::Args)]
pub struct OutputArgs {
    /// Write to FILE (atomically: nothing appears unless the export completes); stdout by default.
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// Replace FILE if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Count rows on stderr even when it is not a terminal: a line a second, then the total.
    #[arg(long)]
    progress: bool,
    /// Only this account.
    #[arg(long)]
    account: Option<String>,
    /// What the ledger held at this recorded time (RFC 3339, or a date meaning its UTC midnight): entries recorded later are left out.
    #[arg(long)]
    as_of: Option<String>,
}

/// `--from D --to D` (occurred_at, UTC; from inclusive, to exclusive).
#[derive(Debug, clap::Args)]
pub struct RangeArgs {
    /// First day, YYYY-MM-DD (or YYYY-MM).
    #[arg(long, value_parser = parse_date)]
    from: NaiveDate,
    /// Day after the last, YYYY-MM-DD (or YYYY-MM).
    #[arg(long, value_parser = parse_date)]
    to: NaiveDate,
    /// Only this resource.
    #[arg(long)]
    resource: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

/// `--period YYYY-MM`.
#[derive(Debug, clap::Args)]
pub struct InvoiceArgs {
    /// The month, YYYY-MM.
    #[arg(long, value_parser = parse_month)]
    period: NaiveDate,
    #[command(flatten)]
    output: OutputArgs,
}

/// Arguments of `tally stats`.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// The month, YYYY-MM (default: this month, UTC, as `GET /v1/admin/stats`).
    #[arg(long, value_parser = parse_month)]
    period: Option<NaiveDate>,
}

/// Arguments of `tally top`.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Resource.
    #[arg(long)]
    resource: String,
    /// The month, YYYY-MM (default: this month, UTC, as `GET /v1/admin/top`).
    #[arg(long, value_parser = parse_month)]
    period: Option<NaiveDate>,
    /// How many accounts, 1 to 1000.
    #[arg(
        long,
        default_value_t = admin::TOP_DEFAULT,
        value_parser = clap::value_parser!(u16).range(i64::from(*admin::TOP_LIMITS.start())..=i64::from(*admin::TOP_LIMITS.end()))
    )]
    limit: u16,
}

/// Refuses an `-o` that is the SQLite database itself, or its `-wal`,
/// `-shm` or `-journal` file, however reached (a symlink, a hard link,
/// another spelling of the path), whether that file exists now or not: with
/// `--overwrite` the export would be renamed over the ledger (review BM:
/// `-o tally.db` for `-o tally.csv`, one word in a cron line, replaced the
/// database with a CSV and exited 0), and a journal or WAL file SQLite finds
/// later is taken as its own.
fn refuse_the_database_as_output(database_url: &str, output: &Path) -> anyhow::Result<()> {
    let Some(database) = crate::store::sqlite_file(database_url)? else {
        return Ok(());
    };
    // SQLite follows a database that is a symlink and keeps its WAL beside
    // the target (review BN: `-o target.db-wal` replaced the live log when
    // the URL named the link).
    let database = where_it_lands(&database).unwrap_or(database);
    let output_lands = crate::export::through_symlinks(output)
        .ok()
        .and_then(|target| where_it_lands(&target));
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut file = database.clone().into_os_string();
        file.push(suffix);
        if output_lands.as_deref() == Some(Path::new(&file)) || same_file(output, Path::new(&file)) {
            anyhow::bail!(
                "-o {} is the database file {} (from --database-url or TALLY_DATABASE_URL): the export would \
                 replace the ledger; name a file of its own, such as export.csv. Nothing was written",
                output.display(),
                Path::new(&file).display()
            );
        }
    }
    Ok(())
}

/// The path `path` names with every link and `.`/`..` resolved, whether the
/// file exists or not (then its folder's, joined with its name); `None`
/// when its folder does not exist either.
fn where_it_lands(path: &Path) -> Option<PathBuf> {
    if let Ok(resolved) = std::fs::canonicalize(path) {
        return Some(resolved);
    }
    let name = path.file_name()?;
    let folder = match path.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder,
        _ => Path::new("."),
    };
    Some(std::fs::canonicalize(folder).ok()?.join(name))
}

/// Whether `a` and `b` are one file, told from their metadata: the
/// `same-file` crate opens both, and opening a named pipe waits for a
/// writer (`-o FIFO`, which the export then refuses, hung there). A path
/// that does not exist is no file of the database.
#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether `a` and `b` are one file (elsewhere than Unix: by their
/// canonical paths, which misses hard links).
#[cfg(not(unix))]
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `period`, or this month when absent, as the HTTP admin reads take it.
fn month_or_this_one(period: Option<NaiveDate>) -> NaiveDate {
    period.unwrap_or_else(|| admin::this_month(chrono::Utc::now()))
}

/// Runs an export.
pub async fn run(settings: &Settings, command: ExportCommand) -> anyhow::Result<ExitCode> {
    let (output, granularity) = match &command {
        ExportCommand::Entries(r) => (&r.output, None),
        ExportCommand::Daily(r) => (&r.output, Some(Granularity::Day)),
        ExportCommand::Monthly(r) => (&r.output, Some(Granularity::Month)),
        ExportCommand::Invoice(i) => (&i.output, None),
    };
    if let Some(path) = &output.output {
        refuse_the_database_as_output(&settings.database_url, path)?;
    }
    let (store, catalog) = settings.open_existing_store().await?;
    let account = output
        .account
        .as_deref()
        .map(AccountId::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let as_of = output
        .as_of
        .as_deref()
        .map(|t| parse_instant_or_date(t).map_err(|m| anyhow::anyhow!("--as-of: {m}")))
        .transpose()?;
    // A file "as of" a moment still to come would change as entries arrive:
    // not the reproducible snapshot --as-of promises.
    if let Some(as_of) = as_of {
        let now = chrono::Utc::now();
        anyhow::ensure!(
            as_of <= now,
            "--as-of ({}) is later than now ({}): what the ledger will hold then is not known yet, so the \
             file could not be made again; leave --as-of out for the ledger as it is now",
            as_of.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
    }
    // Validate everything before creating the output.
    let filter = match &command {
        ExportCommand::Entries(r) | ExportCommand::Daily(r) | ExportCommand::Monthly(r) => {
            anyhow::ensure!(r.from < r.to, "--from ({}) must be before --to ({})", r.from, r.to);
            if granularity == Some(Granularity::Month) {
                for (flag, date) in [("--from", r.from), ("--to", r.to)] {
                    anyhow::ensure!(
                        Granularity::Month.bucket_of(date) == date,
                        "{flag} ({date}) must be the first day of a month for a monthly export (e.g. {})",
                        Granularity::Month.bucket_of(date)
                    );
                }
            }
            let resource = match r.resource.as_deref() {
                None => None,
                Some(name) => Some(super::readable_resource(store.as_ref(), &catalog, account.as_ref(), name).await?),
            };
            Some(ExportFilter {
                from: r.from,
                to: r.to,
                account: account.clone(),
                resource,
                as_of,
            })
        }
        ExportCommand::Invoice(_) => None,
    };
    // Listening before the temp file exists: a signal from here on stops the
    // export cleanly instead of killing the process with the file left.
    let stop = crate::app::stop_requested().context("cannot listen for Ctrl-C or SIGTERM")?;
    let mut out = CsvOutput::to(output.output.as_deref(), output.overwrite)?.with_progress(output.progress);
    let export = async {
        match (&command, filter) {
            (ExportCommand::Entries(_), Some(filter)) => export_entries(store.as_ref(), &filter, &mut out).await,
            (_, Some(filter)) => {
                let granularity = granularity.expect("a totals export has a granularity");
                export_totals(store.as_ref(), granularity, &filter, &mut out).await
            }
            (ExportCommand::Invoice(i), None) => {
                export_invoices(store.as_ref(), &catalog, i.period, account.as_ref(), as_of, &mut out).await
            }
            _ => unreachable!("every export kind is matched above"),
        }
    };
    // Ctrl-C or SIGTERM: stop, and remove the temp file (a killed process
    // would leave it behind), rather than die with it half written.
    let rows = tokio::select! {
        rows = export => match rows {
            Ok(rows) => rows,
            Err(e) => {
                let scope = match &command {
                    ExportCommand::Entries(r) | ExportCommand::Daily(r) | ExportCommand::Monthly(r) => ReadScope {
                        from: r.from,
                        to: r.to,
                        account: output.account.as_deref(),
                        resource: r.resource.as_deref(),
                        granularity,
                    },
                    ExportCommand::Invoice(i) => ReadScope {
                        account: output.account.as_deref(),
                        ..ReadScope::month(i.period)
                    },
                };
                return Err(super::naming_totals_past_64_bits(store.as_ref(), &scope, e.into()).await);
            }
        },
        () = stop => {
            drop(out);
            if output.output.is_some() {
                stderr_line!("interrupted: the export stopped, and wrote no file");
            } else {
                stderr_line!("interrupted: the export stopped; what it wrote to stdout is incomplete");
            }
            return Ok(ExitCode::from(130));
        }
    };
    out.finish()?;
    if rows == 0 {
        // --as-of leaves out what was recorded later: say so, it may be why.
        let as_of = as_of.map_or_else(String::new, |t| {
            format!(" as of {}", t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        });
        match &account {
            Some(a) => {
                stderr_line!("note: no rows for account '{a}' in that range{as_of}; the file holds the header only")
            }
            None => stderr_line!("note: no rows in that range{as_of}; the file holds the header only"),
        }
    }
    match &output.output {
        Some(path) if path.as_os_str() == "-" || path.as_os_str() == "/dev/stdout" => {
            stderr_line!("wrote {rows} rows to standard output")
        }
        Some(path) => stderr_line!("wrote {rows} rows to {}", path.display()),
        None => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// `tally stats`.
pub async fn stats(settings: &Settings, args: StatsArgs) -> anyhow::Result<ExitCode> {
    let (store, catalog) = settings.open_existing_store().await?;
    let month = month_or_this_one(args.period);
    let stats = match admin::stats(store.as_ref(), &catalog, month).await {
        Ok(stats) => stats,
        Err(e) => {
            let scope = ReadScope::month(month);
            return Err(super::naming_totals_past_64_bits(store.as_ref(), &scope, e.into()).await);
        }
    };
    outln!("{}", serde_json::to_string_pretty(&stats)?)?;
    Ok(ExitCode::SUCCESS)
}

/// `tally top`.
pub async fn top(settings: &Settings, args: TopArgs) -> anyhow::Result<ExitCode> {
    let (store, catalog) = settings.open_existing_store().await?;
    let resource = super::readable_resource(store.as_ref(), &catalog, None, &args.resource).await?;
    let month = month_or_this_one(args.period);
    let top = match admin::top(store.as_ref(), &catalog, &resource, month, usize::from(args.limit)).await {
        Ok(top) => top,
        Err(e) => {
            let scope = ReadScope {
                resource: Some(resource.as_str()),
                ..ReadScope::month(month)
            };
            return Err(super::naming_totals_past_64_bits(store.as_ref(), &scope, e.into()).await);
        }
    };
    outln!("{}", serde_json::to_string_pretty(&top)?)?;
    Ok(ExitCode::SUCCESS)
}
