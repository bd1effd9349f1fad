//! `tally rollup`, `tally verify [--repair]`, `tally jobs list|run`.

use std::process::ExitCode;

use chrono::Utc;

use crate::app::Settings;
use crate::jobs::rollup::{self, Failpoint, RollupOptions};
use crate::jobs::{self as scheduled, JobOutcome, JobRunner};
use crate::telemetry::Metrics;

/// Arguments of `tally rollup`.
#[derive(Debug, clap::Args)]
pub struct RollupArgs {
    /// Ledger rows in the first batch (one transaction each), 1 to 10 000 000
    /// [default: 50 000, or --max-batch-size when that is smaller].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    batch_size: Option<u32>,
    /// The most rows a batch grows to while catching up, 1 to 10 000 000
    /// (default: the engine's bound, 10 000 000 on both).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    max_batch_size: Option<u32>,
    /// Test hook: STAGE:BATCH[:abort] with STAGE before_commit or after_commit.
    #[arg(long, env = "TALLY_FAILPOINT", hide = true)]
    failpoint: Option<String>,
}

/// Arguments of `tally verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Rewrite each total that differs to what its folded ledger entries say
    /// (one transaction, no rollup beside it; the ledger is not touched),
    /// list what was rewritten and exit 0.
    #[arg(long)]
    repair: bool,
}

/// The exit code of `tally jobs run` when the job was running elsewhere:
/// sysexits' EX_TEMPFAIL, "try again later".
const SKIPPED: u8 = 75;

/// `tally jobs …`
#[derive(Debug, clap::Subcommand)]
pub enum JobsCommand {
    /// Each job, its schedule (UTC) and its next run.
    List,
    /// Run one job now (on PostgreSQL skipped, exit 75, while a run of it is
    /// in flight in any process; on SQLite only in this one: a second rollup
    /// waits for the write lock and folds what is left).
    Run {
        /// The job's name.
        name: String,
    },
}

/// How long before a `tally rollup` began an entry left out of it must have
/// been recorded for the run to note it: under steady load on PostgreSQL
/// some writes are always in flight, holding back the entries of the last
/// moments, and a note at every run said nothing (review BO). An entry held
/// back this long is waiting on something (a transaction left open).
const HELD_BACK_NOTE_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(2);

/// Runs the rollup once and prints what it folded.
pub async fn rollup(settings: &Settings, args: RollupArgs) -> anyhow::Result<ExitCode> {
    let batch_size = match (args.batch_size, args.max_batch_size) {
        (Some(first), Some(max)) if max < first => anyhow::bail!(
            "--max-batch-size ({max}) is smaller than --batch-size ({first}): batches start at --batch-size \
             and grow up to --max-batch-size; raise the one or lower the other"
        ),
        (Some(first), _) => first,
        (None, max) => max.map_or(rollup::DEFAULT_BATCH, |max| max.min(rollup::DEFAULT_BATCH)),
    };
    let failpoint = args
        .failpoint
        .as_deref()
        .map(Failpoint::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let (store, _) = settings.open_existing_store().await?;
    let options = RollupOptions {
        batch_size,
        max_batch_size: args.max_batch_size,
        failpoint,
    };
    // A script runs `tally rollup` to have current totals: say when entries
    // committed before the run are still out of them (review AQ: not "older
    // than the oldest waiting then", which an earlier entry folded by the run
    // would hide).
    let began = chrono::Utc::now();
    let committed_before = store.committed_so_far().await.ok();
    let report = rollup::run(store.as_ref(), &options, &Metrics::default()).await?;
    outln!("{report}")?;
    let Some(committed_before) = committed_before else {
        return Ok(ExitCode::SUCCESS);
    };
    match store.oldest_unfolded_by(&committed_before).await {
        Ok(Some(oldest)) if began - oldest >= HELD_BACK_NOTE_AFTER => stderr_line!(
            "note: entries recorded since {}, waiting before this run began, are not folded yet: on \
             PostgreSQL a transaction older than them is still open somewhere in the cluster and holds \
             the fold back, since it follows commit order (docs/operations.md, \"The rollup and \
             PostgreSQL's commit order\"); or they committed after the run's last batch. The next run \
             after it ends folds them; checks, usage and exports count them meanwhile",
            oldest.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        ),
        Ok(_) => {}
        // The run succeeded; only the note could not be judged.
        Err(e) => {
            let why = crate::telemetry::cause_chain(&e);
            tracing::warn!(error = %why, "could not tell whether entries are still waiting: {why}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Recomputes the totals from the ledger and prints every difference: exit
/// 0 when they agree, 1 when some differ, 2 when it could not tell (an
/// unreachable database, say), so an alert can tell bad data from an outage.
pub async fn verify(settings: &Settings, args: VerifyArgs) -> anyhow::Result<ExitCode> {
    match compare_totals(settings, args.repair).await {
        Ok(code) => Ok(code),
        Err(error) => {
            stderr_line!("error: {}", crate::telemetry::cause_chain(error.as_ref()));
            Ok(ExitCode::from(2))
        }
    }
}

/// [`verify`]'s work: exit 0 or 1, or the error that kept it from judging
/// (or, with `repair`, from rewriting).
async fn compare_totals(settings: &Settings, repair: bool) -> anyhow::Result<ExitCode> {
    let (store, catalog) = settings.open_existing_store().await?;
    let mismatches = if repair {
        store.repair_totals().await?
    } else {
        store.verify_totals().await?
    };
    // verify judges folded rows only: a rollup that keeps failing (a total
    // past 64 bits, say) leaves them consistent, so say how far behind it is.
    let lag = match crate::usage::rollup_lag_seconds(store.as_ref(), chrono::Utc::now()).await {
        Ok(lag) => lag,
        // A repair has committed by now: what it rewrote must still be told.
        Err(e) if repair => {
            let why = crate::telemetry::cause_chain(&e);
            stderr_line!("note: could not read how far behind the rollup is ({why})");
            0
        }
        Err(e) => return Err(e.into()),
    };
    if lag > 60 {
        stderr_line!(
            "note: the oldest entry not yet folded was recorded {lag} s ago, and verify judges folded rows \
             only. Either no process runs the rollup (every server started with --no-jobs, or a jobs \
             directory without it: `tally jobs list`), or the rollup fails (`tally rollup` says why; \
             docs/operations.md, \"When the rollup keeps failing\"), or, on PostgreSQL, a long transaction \
             anywhere in the cluster holds it back (docs/operations.md, \"The rollup and PostgreSQL's \
             commit order\")"
        );
    }
    if mismatches.is_empty() {
        outln!("ok: every daily and monthly total equals the sum of its folded ledger entries")?;
        return Ok(ExitCode::SUCCESS);
    }
    let amount = |resource: &str, (minor, entries): (i128, i64)| {
        // 128 bits: a total may pass 64 (migration 0011); past Decimal's 96
        // bits it is shown in minor units.
        let amount = rust_decimal::Decimal::try_from_i128_with_scale(minor, catalog.decimals(resource))
            .map_or_else(|_| format!("{minor} minor units"), |d| d.normalize().to_string());
        let noun = if entries == 1 { "entry" } else { "entries" };
        format!("{amount} from {entries} {noun}")
    };
    for m in &mismatches {
        let stored = m
            .actual
            .map_or_else(|| "nothing".to_owned(), |v| amount(&m.resource, v));
        let ledger = m.expected.map_or_else(
            || "has no folded entry for it".to_owned(),
            |v| format!("says {}", amount(&m.resource, v)),
        );
        let done = match (repair, m.expected) {
            (false, _) => "",
            (true, Some(_)) => "; rewritten",
            (true, None) => "; removed",
        };
        outln!("{}: stored {stored}, ledger {ledger}{done}", m.name())?;
    }
    let totals = match mismatches.len() {
        1 => "1 total".to_owned(),
        n => format!("{n} totals"),
    };
    if !repair {
        let verb = if mismatches.len() == 1 { "differs" } else { "differ" };
        stderr_line!("{totals} {verb} from the ledger; `tally verify --repair` rewrites them to what it says");
        return Ok(ExitCode::FAILURE);
    }
    // A process caches the sums it has read (store/settled.rs); the repair
    // is counted, and each process forgets them when it sees the count move.
    stderr_line!(
        "{totals} put right from the ledger (rewritten, or removed where it has no folded entry). Running `serve` processes \
         drop the sums they had read from the old totals within about a second"
    );
    Ok(ExitCode::SUCCESS)
}

/// Lists or runs jobs.
pub async fn run(settings: &Settings, command: JobsCommand) -> anyhow::Result<ExitCode> {
    let definitions = scheduled::load(settings.jobs.as_deref())?;
    match command {
        JobsCommand::List => {
            let now = Utc::now();
            stderr_line!("jobs from {}", scheduled::source(settings.jobs.as_deref()));
            outln!("{:<20} {:<20} {:<16} next run (UTC)", "name", "schedule", "runs")?;
            for job in &definitions {
                outln!(
                    "{:<20} {:<20} {:<16} {}",
                    job.name,
                    job.schedule,
                    job.run.as_str(),
                    job.next_run(now)?.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Run { name } => {
            let (store, catalog) = settings.open_existing_store().await?;
            let context = scheduled::JobContext {
                store,
                catalog,
                metrics: std::sync::Arc::new(Metrics::default()),
                reports_dir: settings.reports_dir.clone(),
            };
            let runner = JobRunner::new(context, definitions);
            match runner.run(&name).await? {
                JobOutcome::Ran(summary) | JobOutcome::Idle(summary) => {
                    outln!("{name}: {summary}")?;
                    Ok(ExitCode::SUCCESS)
                }
                // Not a success: the run elsewhere may still be writing what
                // a script's next step reads (last month's reports, say).
                JobOutcome::Skipped(why) => {
                    stderr_line!(
                        "{name}: skipped: {why}; it is not done yet: run this again when that run has ended \
                         (exit {SKIPPED})"
                    );
                    Ok(ExitCode::from(SKIPPED))
                }
            }
        }
    }
}
