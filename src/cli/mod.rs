//! The `tally` command line: one binary, clap subcommands. Every read has a
//! twin here that talks to the database directly, no server needed.

/// `println!` for command output: writes one line to stdout and returns the
/// write's `io::Result` (see [`print_line`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::print_line(format_args!($($arg)*))
    };
}

mod accounts;
mod export;
mod import;
mod jobs;
mod keys;
mod plans;
mod post;
mod timeseries;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::app::{self, Application, Settings};
use crate::domain::entry::DEFAULT_LATE_HORIZON_DAYS;
use crate::domain::period::Granularity;
use crate::store::{Store, StoreError, TotalName};
use chrono::NaiveDate;

/// The help heading of the options every command takes, so that a
/// command's own flags stand apart from them in its `--help`.
const GLOBAL_OPTIONS: &str = "Global options";

/// Tally: a usage ledger for SaaS products.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about)]
pub struct Cli {
    /// Database URL: sqlite://FILE (created if missing by the commands that write; those that only read refuse a missing file) or postgres://…
    #[arg(long, env = "TALLY_DATABASE_URL", default_value = app::DEFAULT_DATABASE_URL, global = true,
          help_heading = GLOBAL_OPTIONS, value_parser = app::parse_database_url)]
    pub database_url: String,
    /// Plan catalog (TOML); the built-in catalog when absent.
    #[arg(long, env = "TALLY_PLANS", global = true, help_heading = GLOBAL_OPTIONS)]
    pub plans: Option<PathBuf>,
    /// Entries older than this many days are refused as too_late (1 to
    /// 36 500; older history goes in with `tally import --allow-late`).
    #[arg(long, env = "TALLY_LATE_HORIZON_DAYS", default_value_t = DEFAULT_LATE_HORIZON_DAYS, global = true, help_heading = GLOBAL_OPTIONS,
          value_parser = clap::value_parser!(i64).range(1..=36_500))]
    pub late_horizon_days: i64,
    /// Job definitions directory (default: jobs/ when present, else the built-in schedule).
    #[arg(long, env = "TALLY_JOBS", global = true, help_heading = GLOBAL_OPTIONS)]
    pub jobs: Option<PathBuf>,
    /// Where report jobs write (monthly totals and invoices).
    #[arg(long, env = "TALLY_REPORTS_DIR", default_value = "reports", global = true, help_heading = GLOBAL_OPTIONS)]
    pub reports_dir: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API.
    Serve {
        /// Address to listen on: IP:PORT or HOST:PORT.
        #[arg(long, env = "TALLY_LISTEN", default_value = app::DEFAULT_LISTEN, value_parser = app::parse_listen)]
        listen: SocketAddr,
        /// Seconds, from Ctrl-C or SIGTERM, to finish the requests and the job run in flight, then
        /// stop without them (closing the database connections takes up to 5 s more).
        // Negative numbers reach the parser, which names the problem, instead
        // of clap taking "-1" for an unknown flag.
        #[arg(long, env = "TALLY_SHUTDOWN_GRACE", default_value_t = app::DEFAULT_SHUTDOWN_GRACE_SECONDS,
              allow_negative_numbers = true, value_parser = app::parse_shutdown_grace)]
        shutdown_grace: u64,
        /// Seconds to wait for a request's head (and for the next one on a kept-alive connection) and
        /// for the client to take an answer, before dropping the connection; and for a body (plus a
        /// second per 16 KiB received), before answering 408.
        #[arg(long, env = "TALLY_READ_TIMEOUT", default_value_t = app::DEFAULT_READ_TIMEOUT_SECONDS,
              allow_negative_numbers = true, value_parser = app::parse_read_timeout)]
        read_timeout: u64,
        /// Connections to hold open at once; more wait until one closes (for each, the next answer closes
        /// its connection, or one quiet for a second, kept alive and idle or silent since it was accepted,
        /// is closed). The open-file limit is raised to fit them, or the number lowered to fit it (with a
        /// warning).
        #[arg(long, env = "TALLY_MAX_CONNECTIONS", default_value_t = app::DEFAULT_MAX_CONNECTIONS,
              allow_negative_numbers = true, value_parser = app::parse_max_connections)]
        max_connections: usize,
        /// Do not run the scheduled jobs in this process.
        #[arg(long)]
        no_jobs: bool,
    },
    /// Run database migrations and exit.
    Migrate,
    /// Post one entry.
    Post(post::PostArgs),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Work with plan catalogs.
    #[command(subcommand)]
    Plans(plans::PlansCommand),
    /// Bulk-load entries from a CSV file (the entries export format).
    Import(import::ImportArgs),
    /// Fold the ledger into daily and monthly totals once, then exit.
    Rollup(jobs::RollupArgs),
    /// Recompute every total from the ledger; exit 1 and list differences if
    /// any (with --repair: rewrite them, exit 0).
    Verify(jobs::VerifyArgs),
    /// List or run scheduled jobs.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Check whether an account may use AMOUNT more of a resource (records
    /// nothing); exit 0 when allowed, 1 when not, 2 on an error.
    Check(accounts::CheckArgs),
    /// Where an account stands on every limited or used resource.
    Usage(accounts::UsageArgs),
    /// Whether an account's plan gives it a feature (JSON); exit 0 when
    /// allowed, 1 when not, 2 on an error.
    Feature(accounts::FeatureArgs),
    /// Plans, plan history and overrides of accounts.
    #[command(subcommand)]
    Accounts(accounts::AccountsCommand),
    /// Export the ledger, totals or invoices as CSV.
    #[command(subcommand)]
    Export(export::ExportCommand),
    /// Platform totals for a month (admin stats).
    Stats(export::StatsArgs),
    /// Top accounts by usage of a resource in a month.
    Top(export::TopArgs),
    /// Print an account's usage per day or month (exact: folded totals plus the unfolded tail).
    Timeseries(timeseries::TimeseriesArgs),
}

impl Cli {
    fn settings(&self) -> Settings {
        Settings {
            database_url: self.database_url.clone(),
            plans: self.plans.clone(),
            late_horizon_days: self.late_horizon_days,
            // Blank is unset: a key of spaces can never be sent, and would
            // otherwise stop serve from creating the first admin key.
            admin_key: std::env::var("TALLY_ADMIN_KEY").ok().filter(|k| !k.trim().is_empty()),
            jobs: self.jobs.clone(),
            reports_dir: self.reports_dir.clone(),
            ..Settings::default()
        }
    }
}

/// Parses the command line, runs it and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::try_parse().unwrap_or_else(|error| {
        let from_environment = environment_source(&error);
        // `error.exit()` would end the process before the note could follow
        // clap's message: print, note and exit with clap's code by hand.
        if let Some(variable) = from_environment {
            let _ = error.print();
            stderr_line!(
                "note: that value came from the environment variable {variable}, not from the command line; \
                 correct or unset {variable}"
            );
            std::process::exit(error.exit_code());
        }
        error.exit()
    });
    crate::telemetry::init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            stderr_line!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Run the command as a task on a worker thread, not on this thread
    // inside `block_on`: a worker also drives the I/O, so a streaming command
    // (an export reading a socket) is not woken across threads for every
    // message the database sends.
    let outcome = runtime.block_on(async { tokio::spawn(run(cli)).await });
    // Dropping the runtime would wait without end for a blocking task still
    // running (a report export left at shutdown, say): its work is over.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(Ok(code)) => code,
        // A reader that stopped reading (`tally export … | head`) is not an
        // error of ours: stop quietly, as the classic tools do on SIGPIPE.
        Ok(Err(e)) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            stderr_line!("error: {}", crate::telemetry::cause_chain(e.as_ref()));
            ExitCode::FAILURE
        }
        Err(e) => {
            stderr_line!("error: the command failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The environment variable a refused value came from, when it did: clap
/// names the flag (`invalid value '7600' for '--listen <LISTEN>'`) though
/// the command line may not hold it, which sends a reader of a cron or
/// systemd log looking for a flag nobody typed.
fn environment_source(error: &clap::Error) -> Option<String> {
    use clap::CommandFactory as _;
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(error.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation) {
        return None;
    }
    let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg.split_whitespace().next()?.strip_prefix("--")?;
    let typed = std::env::args_os()
        .skip(1)
        .filter_map(|a| a.into_string().ok())
        .any(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")));
    if typed {
        return None;
    }
    let command = Cli::command();
    let mut commands = vec![&command];
    while let Some(command) = commands.pop() {
        commands.extend(command.get_subcommands());
        let env = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_env());
        if let Some(variable) = env.filter(|variable| std::env::var_os(variable).is_some()) {
            return Some(variable.to_string_lossy().into_owned());
        }
    }
    None
}

/// The totals a report reads: buckets from `from` (inclusive) to `to`
/// (exclusive), of one account and one resource when given.
pub(crate) struct ReadScope<'a> {
    /// The first day read.
    pub from: NaiveDate,
    /// The day after the last day read.
    pub to: NaiveDate,
    /// The one account read, if only one.
    pub account: Option<&'a str>,
    /// The one resource read, if only one.
    pub resource: Option<&'a str>,
    /// Only totals of this granularity are read (an export of daily or of
    /// monthly totals); `None`: both may be.
    pub granularity: Option<Granularity>,
}

impl ReadScope<'_> {
    /// Every total of the month starting `month`.
    pub(crate) fn month(month: NaiveDate) -> Self {
        ReadScope {
            from: month,
            to: Granularity::Month.next(month),
            account: None,
            resource: None,
            granularity: None,
        }
    }

    /// Whether the report reads `total`.
    fn holds(&self, total: &TotalName) -> bool {
        // A monthly total is read when any of its days is.
        let first = match total.granularity {
            Granularity::Day => self.from,
            Granularity::Month => Granularity::Month.bucket_of(self.from),
        };
        (first..self.to).contains(&total.bucket)
            && self.granularity.is_none_or(|read| read == total.granularity)
            && self.account.is_none_or(|account| account == total.account)
            && self.resource.is_none_or(|resource| resource == total.resource)
    }
}

/// `error`, and when it is a sum past 64 bits of minor units, the stored
/// totals in `scope` past them named too: a report over many totals fails
/// for one of them, and the database's overflow error does not say which.
pub(crate) async fn naming_totals_past_64_bits(
    store: &dyn Store,
    scope: &ReadScope<'_>,
    error: anyhow::Error,
) -> anyhow::Error {
    let Some(detail) = error.chain().find_map(overflow_detail).map(str::to_owned) else {
        return error;
    };
    let totals = store.totals_past_64_bits().await.map(|totals| {
        totals
            .into_iter()
            .filter(|total| scope.holds(total))
            .collect::<Vec<_>>()
    });
    match totals {
        Ok(totals) if !totals.is_empty() => {
            const NAMED: usize = 10;
            let mut names = totals
                .iter()
                .take(NAMED)
                .map(|total| format!("the {total}"))
                .collect::<Vec<_>>()
                .join(", ");
            if totals.len() > NAMED {
                names.push_str(&format!(" and {} more", totals.len() - NAMED));
            }
            let count = match totals.len() {
                1 => "a stored total is".to_owned(),
                n => format!("{n} stored totals are"),
            };
            // One message, not the overflow's with this as its context: its
            // advice would be said twice. The sum that failed keeps its
            // name: it may be another (an unfolded one) than those stored.
            anyhow::anyhow!(
                "a sum passed the 64-bit range of minor units ({detail}); {count} past it among those this \
                 command reads: {names}; {}",
                crate::store::OVERFLOW_ADVICE
            )
        }
        // None is stored past them (a sum over accounts, say, or a total
        // not folded yet), or they could not be read: the error as it is.
        _ => error,
    }
}

/// The sum named by `cause` when it is a [`StoreError::Overflow`]. The
/// errors that wrap a store error name it as their `source`, so a chain walk
/// meets it.
fn overflow_detail<'e>(cause: &'e (dyn std::error::Error + 'static)) -> Option<&'e str> {
    match cause.downcast_ref::<StoreError>() {
        Some(StoreError::Overflow { detail }) => Some(detail),
        _ => None,
    }
}

/// A resource `--resource` names: declared, or dropped from the catalog with
/// entries still in the ledger; else the catalog's "not in the catalog" error.
pub(crate) async fn readable_resource(
    store: &dyn crate::store::Store,
    catalog: &crate::domain::Catalog,
    account: Option<&crate::domain::AccountId>,
    name: &str,
) -> anyhow::Result<crate::domain::ResourceName> {
    match crate::usage::readable_resource(store, catalog, account, name).await? {
        Some(resource) => Ok(resource),
        // Its error lists the known resources.
        None => Ok(catalog.resource(name).map(|(known, _)| known.clone())?),
    }
}

/// Writes one line to stdout. A reader that has gone (`tally keys list |
/// head -1`) is not an error: the rest of the output is dropped, and the
/// command still ends with its own exit code (`check`'s says allowed or not;
/// `println!` would panic, exit 1 and look like a refusal). Any other write
/// error is returned.
pub(crate) fn print_line(line: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    use std::io::Write as _;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => written,
    }
}

/// Whether `error` comes from writing to a closed pipe.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Whether stderr is `/dev/null`, which takes every write and keeps none: a
/// bootstrap key shown there is lost as surely as one whose write failed
/// (review BQ: `serve 2>&-` kept a valid admin key nobody had seen).
fn stderr_is_dev_null() -> bool {
    use std::os::fd::AsFd as _;
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .is_ok_and(|fd| is_dev_null(&std::fs::File::from(fd)))
}

/// Whether `file` is `/dev/null` (another character device, a terminal
/// say, is not).
fn is_dev_null(file: &std::fs::File) -> bool {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    match (file.metadata(), std::fs::metadata("/dev/null")) {
        (Ok(file), Ok(null)) => file.file_type().is_char_device() && file.rdev() == null.rdev(),
        _ => false,
    }
}

/// Runs one parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = cli.settings();
    let opened = settings.opened.clone();
    let outcome = run_command(cli.command, settings).await;
    // Whatever the outcome: SQLite's commits go from the WAL into the file.
    opened.close_all().await;
    outcome
}

/// Runs `command` with `settings`.
async fn run_command(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve {
            listen,
            shutdown_grace,
            read_timeout,
            max_connections,
            no_jobs,
        } => {
            let shutdown_grace = std::time::Duration::from_secs(shutdown_grace);
            serve(
                Settings {
                    listen,
                    shutdown_grace,
                    read_timeout: std::time::Duration::from_secs(read_timeout),
                    max_connections,
                    ..settings
                },
                !no_jobs,
            )
            .await
        }
        Command::Migrate => {
            settings.open_store().await?;
            // Both engines' folders mirror each other (a test checks it).
            let latest = sqlx::migrate!("migrations/sqlite")
                .migrations
                .last()
                .map_or(0, |m| m.version);
            stderr_line!(
                "{} is at the latest schema, migration {latest:04} (the log lines above name any this run applied)",
                crate::store::redact_url(&settings.database_url)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Post(args) => post::run(&settings, args).await,
        Command::Keys(command) => keys::run(&settings, command).await,
        Command::Plans(command) => plans::run(&settings, command),
        Command::Import(args) => import::run(&settings, args).await,
        Command::Rollup(args) => jobs::rollup(&settings, args).await,
        Command::Verify(args) => jobs::verify(&settings, args).await,
        Command::Jobs(command) => jobs::run(&settings, command).await,
        Command::Timeseries(args) => timeseries::timeseries(&settings, args).await,
        Command::Check(args) => accounts::check(&settings, args).await,
        Command::Export(command) => export::run(&settings, command).await,
        Command::Stats(args) => export::stats(&settings, args).await,
        Command::Top(args) => export::top(&settings, args).await,
        Command::Usage(args) => accounts::usage(&settings, args).await,
        Command::Feature(args) => accounts::feature(&settings, args).await,
        Command::Accounts(command) => accounts::run(&settings, command).await,
    }
}

async fn serve(settings: Settings, with_jobs: bool) -> anyhow::Result<ExitCode> {
    let application = Application::build(&settings).await?;
    let (scheduler, runner) = if with_jobs {
        let definitions = crate::jobs::load(settings.jobs.as_deref())?;
        let names: Vec<_> = definitions
            .iter()
            .map(|j| format!("{} ({})", j.name, j.schedule))
            .collect();
        let source = crate::jobs::source(settings.jobs.as_deref());
        tracing::info!(jobs = %names.join(", "), %source, "scheduling jobs from {source}: {}", names.join(", "));
        let runner = application.job_runner(definitions);
        (Some(crate::jobs::Scheduler::start(runner.clone()).await?), Some(runner))
    } else {
        (None, None)
    };
    // TALLY_ADMIN_KEY is a key: API.md creates one only where there is none.
    if settings.admin_key.is_some() {
        tracing::info!("no bootstrap key created: TALLY_ADMIN_KEY is accepted as the admin key");
    } else {
        let bootstrap = application
            .bootstrap_admin_key(|secret| {
                use std::io::Write as _;
                if stderr_is_dev_null() {
                    return Err(std::io::Error::other(
                        "stderr is /dev/null (sent there, or closed, which the runtime reopens on \
                         /dev/null), where nobody can read it",
                    ));
                }
                let mut stderr = std::io::stderr().lock();
                let shown = writeln!(
                    stderr,
                    "No API key existed, so Tally created this admin key. It is shown once; keep it:"
                )
                .and_then(|()| writeln!(stderr, "{}", secret.expose()))
                .and_then(|()| stderr.flush());
                shown.map_err(|e| std::io::Error::new(e.kind(), format!("writing it to stderr failed: {e}")))
            })
            .await?;
        match bootstrap {
            app::Bootstrap::Created => tracing::info!("created the bootstrap admin key, shown above"),
            app::Bootstrap::HadKeys { admin_valid: true } => tracing::info!(
                "no bootstrap key created: the database has keys (revoked ones count); \
                 `tally keys list` shows them, `tally keys create --role admin` makes another"
            ),
            // Revoked keys count as keys, so no bootstrap key comes again:
            // say that nobody can administer this server (review BC: after a
            // bootstrap key was revoked unseen, restarts were silent).
            app::Bootstrap::HadKeys { admin_valid: false } => tracing::warn!(
                "no admin key is valid in this database and TALLY_ADMIN_KEY is unset, so no request can use \
                 the admin endpoints; create one with `tally keys create --role admin` (revoked keys count as \
                 keys, so no bootstrap key is created)"
            ),
        }
    }
    tracing::info!(
        listen = %settings.listen,
        database = %crate::store::redact_url(&settings.database_url),
        "tally listening on http://{}",
        std::net::SocketAddr::new(settings.listen.ip(), application.port())
    );
    // The grace bounds the whole stop, counted from the signal: requests in
    // flight first, then the job run in flight with what is left of it.
    let asked_to_stop = Arc::new(std::sync::OnceLock::new());
    let signal = {
        let asked_to_stop = asked_to_stop.clone();
        async move {
            app::shutdown_signal().await;
            let _ = asked_to_stop.set(tokio::time::Instant::now());
            // From the signal on, no run starts and a rollup begins no
            // further batch, while the requests in flight finish.
            if let Some(runner) = runner {
                runner.close();
            }
        }
    };
    application.run_until(signal).await?;
    if let Some(scheduler) = scheduler {
        let asked = asked_to_stop.get().copied().unwrap_or_else(tokio::time::Instant::now);
        scheduler.shutdown(asked + settings.shutdown_grace).await;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;

    /// The bootstrap key is refused to /dev/null only: a terminal, another
    /// character device, must still show it (review BR: a mutant refusing
    /// every character device went untested).
    #[test]
    fn only_dev_null_is_taken_for_dev_null() {
        let open = |path: &str| std::fs::OpenOptions::new().write(true).open(path).unwrap();
        assert!(super::is_dev_null(&open("/dev/null")));
        assert!(!super::is_dev_null(&open("/dev/zero")), "a character device, not null");
        assert!(!super::is_dev_null(&tempfile::tempfile().unwrap()));
    }
    use clap::Parser as _;

    use super::{Cli, Granularity, ReadScope, TotalName};

    /// A report is told only of the totals past 64 bits it reads, not of
    /// every such total in the database.
    #[test]
    fn a_read_scope_holds_the_totals_a_report_reads() {
        let day = |d: &str| d.parse::<NaiveDate>().unwrap();
        let total = |granularity, account: &str, resource: &str, bucket: &str| TotalName {
            granularity,
            account: account.to_owned(),
            resource: resource.to_owned(),
            bucket: day(bucket),
        };
        let november = ReadScope::month(day("2026-11-01"));
        assert!(november.holds(&total(Granularity::Day, "a", "r", "2026-11-30")));
        assert!(november.holds(&total(Granularity::Month, "a", "r", "2026-11-01")));
        assert!(!november.holds(&total(Granularity::Day, "a", "r", "2026-12-01")));
        assert!(!november.holds(&total(Granularity::Month, "a", "r", "2026-10-01")));
        // A daily export from the 15th reads November's monthly total's days.
        let from_the_15th = ReadScope {
            from: day("2026-11-15"),
            to: day("2026-11-20"),
            account: Some("a"),
            resource: Some("r"),
            granularity: None,
        };
        assert!(from_the_15th.holds(&total(Granularity::Month, "a", "r", "2026-11-01")));
        assert!(!from_the_15th.holds(&total(Granularity::Day, "a", "r", "2026-11-14")));
        assert!(!from_the_15th.holds(&total(Granularity::Day, "b", "r", "2026-11-16")));
        assert!(!from_the_15th.holds(&total(Granularity::Day, "a", "s", "2026-11-16")));
        let days_only = ReadScope {
            granularity: Some(Granularity::Day),
            ..from_the_15th
        };
        assert!(days_only.holds(&total(Granularity::Day, "a", "r", "2026-11-16")));
        assert!(!days_only.holds(&total(Granularity::Month, "a", "r", "2026-11-01")));
    }

    #[test]
    fn a_negative_shutdown_grace_is_named_as_such_not_taken_for_a_flag() {
        // clap once answered "unexpected argument '-1' found".
        let error = Cli::try_parse_from(["tally", "serve", "--shutdown-grace", "-1"]).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("\"-1\" is not a whole number of seconds from 0 to 86400"),
            "{message}"
        );
        let parsed = Cli::try_parse_from(["tally", "serve", "--shutdown-grace", "0"]);
        assert!(parsed.is_ok(), "{:?}", parsed.err());
    }

    /// Review AY: a read timeout of u64::MAX seconds was taken, and every
    /// connection then panicked setting its timer; a grace as long would
    /// panic at the stop. Both are capped at a day.
    #[test]
    fn waits_past_a_day_are_refused_before_they_overflow_a_timer() {
        for flag in ["--shutdown-grace", "--read-timeout"] {
            for huge in ["86401", "18446744073709551615"] {
                let error = Cli::try_parse_from(["tally", "serve", flag, huge]).unwrap_err();
                let message = error.to_string();
                assert!(message.contains("(a day)"), "{flag} {huge}: {message}");
            }
            let parsed = Cli::try_parse_from(["tally", "serve", flag, "86400"]);
            assert!(parsed.is_ok(), "{flag}: {:?}", parsed.err());
        }
        let error = Cli::try_parse_from(["tally", "serve", "--read-timeout", "0"]).unwrap_err();
        assert!(error.to_string().contains("from 1 to 86400"), "{error}");
    }

    #[test]
    fn an_empty_database_url_says_where_it_may_come_from() {
        for empty in ["", " "] {
            let error = Cli::try_parse_from(["tally", "--database-url", empty, "migrate"]).unwrap_err();
            let message = error.to_string();
            assert!(
                message.contains("the database URL is empty (is TALLY_DATABASE_URL set to nothing?)"),
                "{message}"
            );
        }
    }

    #[test]
    fn max_connections_takes_one_to_a_million() {
        for bad in ["0", "-1", "1000001", "many"] {
            let error = Cli::try_parse_from(["tally", "serve", "--max-connections", bad]).unwrap_err();
            let message = error.to_string();
            assert!(
                message.contains("is not a whole number of connections from 1 to 1000000"),
                "{bad}: {message}"
            );
        }
        for good in ["1", "1000000"] {
            let parsed = Cli::try_parse_from(["tally", "serve", "--max-connections", good]);
            assert!(parsed.is_ok(), "{good}: {:?}", parsed.err());
        }
    }
}
