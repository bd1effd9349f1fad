//! Scheduled jobs. Definitions live in `jobs/*.toml` (name, 6- or 7-field cron in
//! UTC, what to run); `serve` fires them with tokio-cron-scheduler, and every
//! job can be run by hand (`tally jobs run NAME`, `tally rollup`).
//!
//! tokio-cron-scheduler prevents neither overlapping runs nor runs on several
//! replicas, so each run holds an in-process mutex and the store's job lock
//! (a PostgreSQL advisory lock). Shutdown waits for the run in flight.

pub mod reports;
pub mod rollup;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};

use crate::domain::Catalog;
use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;

/// What can go wrong loading, scheduling or running jobs.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A schedule that is not a cron of 6 fields (7 with a year).
    #[error("schedule {schedule:?} is not a cron of 6 fields, or 7 with a year (sec min hour dom month dow [year])")]
    BadSchedule {
        /// The schedule as written.
        schedule: String,
        /// Why the parser refused it.
        #[source]
        source: croner::errors::CronError,
    },
    /// A schedule for a date that never comes (`0 0 0 31 2 *`).
    #[error("schedule {schedule:?} of job '{job}' never fires")]
    NeverFires {
        /// The schedule as written.
        schedule: String,
        /// The job's name.
        job: String,
        /// Why no next time was found.
        #[source]
        source: croner::errors::CronError,
    },
    /// The jobs directory cannot be read.
    #[error("cannot read the jobs directory {}", .dir.display())]
    ReadDirectory {
        /// The directory.
        dir: PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// The jobs directory holds no job files.
    #[error(
        "the jobs directory {} holds no job files (*.toml), so nothing would run, not even the rollup; \
         add job files (the repository's jobs/ has the built-in ones), remove the directory to use the \
         built-in schedule, or run serve --no-jobs",
        .0.display()
    )]
    NoJobFiles(PathBuf),
    /// A job file cannot be read.
    #[error("cannot read {}", .path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// A job file is not a job definition.
    #[error("invalid job file {}", .path.display())]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// What does not parse.
        #[source]
        source: toml::de::Error,
    },
    /// A job file names its job with nothing but spaces.
    #[error(
        "invalid job file {}: name is empty; name the job (it is what `tally jobs run NAME` takes)",
        .0.display()
    )]
    EmptyName(PathBuf),
    /// A rollup job file asks for `overwrite`.
    #[error(
        "invalid job file {}: overwrite applies to report jobs only; the rollup never rewrites a total",
        .0.display()
    )]
    OverwriteOnRollup(PathBuf),
    /// A job file's schedule is refused.
    #[error("in {}", .path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with its schedule.
        #[source]
        source: Box<JobError>,
    },
    /// Two job files name the same job.
    #[error(
        "{} and {} both define job '{name}'; job names must be unique",
        .first.display(),
        .second.display()
    )]
    DuplicateName {
        /// The file read first.
        first: PathBuf,
        /// The file read second.
        second: PathBuf,
        /// The job's name.
        name: String,
    },
    /// No job has the name asked for.
    #[error("no job named '{name}'; jobs: {known}")]
    UnknownJob {
        /// The name asked for.
        name: String,
        /// The jobs there are, comma-separated.
        known: String,
    },
    /// The store failed (taking the job lock).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The rollup failed.
    #[error(transparent)]
    Rollup(#[from] rollup::RollupError),
    /// The monthly reports failed.
    #[error("{0}")]
    Reports(#[from] reports::ReportsError),
    /// The job scheduler cannot be created.
    #[error("cannot create the job scheduler")]
    CreateScheduler(#[source] JobSchedulerError),
    /// A job cannot be scheduled.
    #[error("cannot schedule job '{name}' ({schedule:?})")]
    Schedule {
        /// The job's name.
        name: String,
        /// Its schedule.
        schedule: String,
        /// Why not.
        #[source]
        source: JobSchedulerError,
    },
    /// A job cannot be added to the scheduler.
    #[error("cannot add a job to the scheduler")]
    AddJob(#[source] JobSchedulerError),
    /// The job scheduler cannot be started.
    #[error("cannot start the job scheduler")]
    StartScheduler(#[source] JobSchedulerError),
}

/// The default schedule when no `jobs/` directory is found: fold every 10 s;
/// last month's reports at 00:05 UTC on the 1st.
pub const BUILTIN_JOBS: &[(&str, &str, JobKind)] = &[
    ("rollup", "*/10 * * * * *", JobKind::Rollup),
    ("monthly-reports", "0 5 0 1 * *", JobKind::MonthlyReports),
];

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Fold the ledger into daily and monthly totals.
    Rollup,
    /// Write last month's monthly totals and invoice CSVs into the reports directory.
    MonthlyReports,
}

impl JobKind {
    /// The name used in job files.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Rollup => "rollup",
            JobKind::MonthlyReports => "monthly_reports",
        }
    }
}

/// One scheduled job.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobDefinition {
    /// Unique name (`tally jobs run NAME`).
    pub name: String,
    /// Cron with seconds: `sec min hour day-of-month month day-of-week`, in UTC.
    pub schedule: String,
    /// What it runs.
    pub run: JobKind,
    /// A description for people.
    #[serde(default)]
    pub description: Option<String>,
    /// For report jobs: replace reports that exist (default: keep them).
    #[serde(default)]
    pub overwrite: bool,
}

impl JobDefinition {
    /// The next time the schedule fires after `after`.
    pub fn next_run(&self, after: DateTime<Utc>) -> Result<DateTime<Utc>, JobError> {
        parse_schedule(&self.schedule)?
            .find_next_occurrence(&after, false)
            .map_err(|source| JobError::NeverFires {
                schedule: self.schedule.clone(),
                job: self.name.clone(),
                source,
            })
    }
}

fn parse_schedule(schedule: &str) -> Result<croner::Cron, JobError> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(schedule)
        .map_err(|source| JobError::BadSchedule {
            schedule: schedule.to_owned(),
            source,
        })
}

/// The directory the jobs come from: `dir` when given, else `jobs/` in the
/// working directory when it is there; `None` for the built-in schedule.
fn jobs_dir(dir: Option<&Path>) -> Option<PathBuf> {
    match dir {
        Some(dir) => Some(dir.to_owned()),
        None => Some(PathBuf::from("jobs")).filter(|d| d.is_dir()),
    }
}

/// Where [`load`] takes the jobs from, for the log and `tally jobs list`: a
/// service started in another working directory (systemd's is `/`) does not
/// see `jobs/`, and would otherwise run the built-in schedule unsaid.
pub fn source(dir: Option<&Path>) -> String {
    match jobs_dir(dir) {
        Some(dir) => {
            let full = std::path::absolute(&dir).unwrap_or(dir);
            format!("the job files in {}", full.display())
        }
        None => "the built-in schedule (no --jobs, TALLY_JOBS or jobs/ in the working directory)".to_owned(),
    }
}

/// Where job definitions come from: `--jobs DIR`, else `jobs/` when present,
/// else the built-in schedule.
pub fn load(dir: Option<&Path>) -> Result<Vec<JobDefinition>, JobError> {
    let Some(dir) = jobs_dir(dir) else {
        return Ok(builtin());
    };
    let mut jobs: BTreeMap<String, (JobDefinition, PathBuf)> = BTreeMap::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|source| JobError::ReadDirectory {
            dir: dir.clone(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    // An empty directory would silently schedule nothing, the rollup included.
    if paths.is_empty() {
        return Err(JobError::NoJobFiles(dir));
    }
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|source| JobError::ReadFile {
            path: path.clone(),
            source,
        })?;
        let job: JobDefinition = toml::from_str(&text).map_err(|source| JobError::InvalidFile {
            path: path.clone(),
            source,
        })?;
        if job.name.trim().is_empty() {
            return Err(JobError::EmptyName(path));
        }
        if job.overwrite && job.run == JobKind::Rollup {
            return Err(JobError::OverwriteOnRollup(path));
        }
        // `next_run` parses it too, and refuses a date that never comes
        // (`0 0 0 31 2 *`), which would leave the job silently idle.
        if let Err(e) = job.next_run(Utc::now()) {
            return Err(JobError::InFile {
                path,
                source: Box::new(e),
            });
        }
        if let Some((_, first)) = jobs.get(&job.name) {
            return Err(JobError::DuplicateName {
                first: first.clone(),
                second: path,
                name: job.name,
            });
        }
        jobs.insert(job.name.clone(), (job, path));
    }
    // Allowed (the rollup may run elsewhere, e.g. `tally rollup` from cron),
    // but worth a word: without it totals, reports and stats fall behind.
    if !jobs.values().any(|(job, _)| job.run == JobKind::Rollup) {
        let dir = dir.display();
        tracing::warn!(
            jobs.dir = %dir,
            "no job in {dir} runs the rollup: unless it runs elsewhere (another replica, or `tally rollup` \
             from cron), totals, reports and stats fall behind, and checks slow down as the unfolded tail grows"
        );
    }
    Ok(jobs.into_values().map(|(job, _)| job).collect())
}

/// The built-in schedule.
pub fn builtin() -> Vec<JobDefinition> {
    BUILTIN_JOBS
        .iter()
        .map(|(name, schedule, run)| JobDefinition {
            name: (*name).into(),
            schedule: (*schedule).into(),
            run: *run,
            description: None,
            overwrite: false,
        })
        .collect()
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// It ran; a summary for the log.
    Ran(String),
    /// It ran and found nothing to do (a rollup with nothing to fold); its
    /// summary goes to the debug log only, as a scheduled rollup finds
    /// nothing most of the times it runs.
    Idle(String),
    /// Another run held the lock (in this process or another); nothing done.
    Skipped(String),
}

/// What jobs work with.
#[derive(Clone)]
pub struct JobContext {
    /// The database.
    pub store: Arc<dyn Store>,
    /// Plans and resources.
    pub catalog: Arc<Catalog>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Where report jobs write.
    pub reports_dir: PathBuf,
}

/// Runs jobs by name, one run of each at a time.
pub struct JobRunner {
    context: JobContext,
    jobs: BTreeMap<String, (JobDefinition, Arc<Mutex<()>>)>,
    /// Set by [`JobRunner::drain`]: no run starts after it, even from a
    /// scheduler tick that fires once the drain is over.
    closed: std::sync::atomic::AtomicBool,
}

impl JobRunner {
    /// A runner for `jobs`.
    pub fn new(context: JobContext, jobs: Vec<JobDefinition>) -> Self {
        for job in &jobs {
            context.metrics.job_known(&job.name);
        }
        let jobs = jobs
            .into_iter()
            .map(|j| (j.name.clone(), (j, Arc::new(Mutex::new(())))))
            .collect();
        Self {
            context,
            jobs,
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The definitions, by name.
    pub fn definitions(&self) -> impl Iterator<Item = &JobDefinition> {
        self.jobs.values().map(|(j, _)| j)
    }

    /// Runs job `name` now, unless a run of it is in flight here or elsewhere.
    pub async fn run(&self, name: &str) -> Result<JobOutcome, JobError> {
        let (job, guard) = self.jobs.get(name).ok_or_else(|| JobError::UnknownJob {
            name: name.to_owned(),
            known: self.jobs.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        let Ok(_running) = guard.try_lock() else {
            return Ok(JobOutcome::Skipped(format!(
                "job '{name}' is already running in this process"
            )));
        };
        // Read under the guard: a drain sets it before taking the guards, so
        // a run either holds its guard first (and the drain waits for it) or
        // sees the flag.
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(JobOutcome::Skipped(format!(
                "job '{name}' not started: the jobs are shutting down"
            )));
        }
        let context = &self.context;
        let lock = match context.store.try_job_lock(name).await {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                return Ok(JobOutcome::Skipped(format!(
                    "job '{name}' is running in another process"
                )));
            }
            Err(e) => {
                // Before the job itself began (the database out of reach,
                // say): counted as its failure all the same, or /metrics and
                // /healthz would show none while every run fails.
                if job.run == JobKind::Rollup {
                    context.metrics.rollup_failed();
                }
                context.metrics.job_failed(name);
                return Err(e.into());
            }
        };
        let result = match job.run {
            JobKind::Rollup => rollup::run_until(
                context.store.as_ref(),
                &rollup::RollupOptions::default(),
                &context.metrics,
                &self.closed,
            )
            .await
            .map(|report| {
                if report.entries == 0 && !report.stopped {
                    JobOutcome::Idle(report.to_string())
                } else {
                    JobOutcome::Ran(report.to_string())
                }
            })
            .map_err(JobError::from),
            JobKind::MonthlyReports => reports::catch_up(
                context.store.as_ref(),
                &context.catalog,
                &context.reports_dir,
                reports::previous_month(Utc::now()),
                job.overwrite,
            )
            .await
            .map(JobOutcome::Ran)
            .map_err(JobError::from),
        };
        lock.release().await;
        if result.is_err() {
            context.metrics.job_failed(name);
        }
        result
    }

    /// The jobs running now, by name.
    pub fn running(&self) -> Vec<String> {
        self.jobs
            .iter()
            .filter(|(_, (_, guard))| guard.try_lock().is_err())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Keeps runs from starting from now on, and a rollup in flight from
    /// beginning another batch. `serve` closes at the stop signal, before it
    /// waits for requests in flight (review AS: a run used to start then).
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Release);
    }

    /// [`JobRunner::close`], then waits until no run is in flight; the
    /// guards it returns keep runs out too while held.
    pub async fn drain(&self) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        self.close();
        let mut guards = Vec::new();
        for (_, guard) in self.jobs.values() {
            guards.push(guard.lock().await);
        }
        guards
    }
}

/// Runs job `name` and logs how it went.
async fn run_and_log(runner: &JobRunner, name: &str) {
    match runner.run(name).await {
        // A report job's line names the instant its files are as of, which
        // rebuilding them needs (docs/reports.md).
        Ok(JobOutcome::Ran(summary)) => tracing::info!(job = %name, "job {name}: {summary}"),
        Ok(JobOutcome::Idle(summary)) => tracing::debug!(job = %name, "job {name}: {summary}"),
        Ok(JobOutcome::Skipped(why)) => tracing::debug!(job = %name, "job {name} skipped: {why}"),
        Err(e) => {
            let cause = crate::telemetry::cause_chain(&e);
            tracing::error!(job = %name, error = %cause, "job {name} failed: {cause}")
        }
    }
}

/// Fires the jobs on their schedules until shut down.
pub struct Scheduler {
    scheduler: JobScheduler,
    runner: Arc<JobRunner>,
}

impl Scheduler {
    /// Registers every job of `runner` and starts firing them.
    pub async fn start(runner: Arc<JobRunner>) -> Result<Self, JobError> {
        let scheduler = JobScheduler::new().await.map_err(JobError::CreateScheduler)?;
        for definition in runner.definitions() {
            let name = definition.name.clone();
            let job_runner = runner.clone();
            let job = Job::new_async(definition.schedule.as_str(), move |_id, _scheduler| {
                let runner = job_runner.clone();
                let name = name.clone();
                Box::pin(async move { run_and_log(&runner, &name).await })
            })
            .map_err(|source| JobError::Schedule {
                name: definition.name.clone(),
                schedule: definition.schedule.clone(),
                source,
            })?;
            scheduler.add(job).await.map_err(JobError::AddJob)?;
        }
        scheduler.start().await.map_err(JobError::StartScheduler)?;
        let reports_dir = &runner.context.reports_dir;
        for definition in runner.definitions().filter(|j| j.run == JobKind::MonthlyReports) {
            if let Some(problem) = reports::unusable_directory(reports_dir) {
                let name = &definition.name;
                let why = crate::telemetry::cause_chain(&problem);
                let next = definition.next_run(Utc::now()).map_or_else(
                    |_| "its next run".to_owned(),
                    |at| format!("its next run, {}", at.format("%Y-%m-%d %H:%M UTC")),
                );
                tracing::warn!(job = %name, error = %why, "job {name} will fail at {next}: {why}");
            }
        }
        // The schedule only looks ahead: a report run missed while the server
        // was down would otherwise wait for the next 1st.
        if reports::overdue(reports_dir, Utc::now()) {
            for definition in runner.definitions().filter(|j| j.run == JobKind::MonthlyReports) {
                let name = definition.name.clone();
                tracing::info!(
                    job = %name,
                    "job {name}: {} lacks last month's reports (a run was missed); running it now",
                    reports_dir.display()
                );
                let runner = runner.clone();
                tokio::spawn(async move { run_and_log(&runner, &name).await });
            }
        }
        Ok(Self { scheduler, runner })
    }

    /// Stops firing and waits for the runs in flight until `deadline`, then
    /// leaves them. A run left is safe to drop: the rollup begins no batch
    /// once the drain began, and its batch in flight is one transaction,
    /// which either commits while the stores close or is rolled back when
    /// the process's connection goes, for the next run to fold (a report
    /// file is renamed into place only once written whole).
    pub async fn shutdown(mut self, deadline: tokio::time::Instant) {
        if let Err(e) = self.scheduler.shutdown().await {
            tracing::warn!(error = %e, "job scheduler did not shut down cleanly: {e}");
        }
        // Asked after the scheduler stopped, so no tick can start a run
        // meanwhile (nor be turned away by this look at the guards).
        let running = self.runner.running();
        let names = if running.is_empty() {
            "a run that began as the scheduler stopped".to_owned()
        } else {
            running.join(", ")
        };
        let drain = self.runner.drain();
        tokio::pin!(drain);
        if !running.is_empty() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            tracing::info!(
                jobs = %names,
                "waiting up to {} s (the rest of --shutdown-grace) for the job run in flight: {names}",
                left.as_secs_f64().ceil()
            );
        }
        if tokio::time::timeout_at(deadline, &mut drain).await.is_ok() {
            tracing::info!("jobs stopped");
            return;
        }
        tracing::warn!(
            jobs = %names,
            "stopping without the job run in flight ({names}): it did not end within --shutdown-grace (the \
             database may be stalled or a lock held); it begins no further batch, and the one in flight either \
             commits while the database connections close (Tally waits {} s for it) or is rolled back; nothing is counted \
             twice and the next run does the rest",
            crate::store::CLOSE_WAIT.as_secs()
        );
    }
}
