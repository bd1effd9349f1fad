//! The monthly reports job: on the 1st, last month's monthly totals and
//! invoice CSVs land in the reports directory, written atomically (temp file,
//! then rename) and never over an existing report unless the job says so.
//!
//! The directory is the job's cursor: a run writes every month after the
//! newest month whose two reports are there, up to last month, so a missed
//! 1st (the server down, the database unreachable) is made up by the next
//! run instead of lost. `report_of` reads the names `report_paths` makes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Months, NaiveDate, Utc};

use crate::domain::Catalog;
use crate::domain::period::{Granularity, month_start};
use crate::export::invoice::export_invoices;
use crate::export::ledger::export_totals;
use crate::export::{CsvOutput, ExportError};
use crate::store::{ExportFilter, Store};

/// What can go wrong writing the monthly reports.
#[derive(Debug, thiserror::Error)]
pub enum ReportsError {
    /// A month's reports failed (a run stops at the first).
    #[error("writing the reports of {}", .month.format("%Y-%m"))]
    Month {
        /// The month (its first day).
        month: NaiveDate,
        /// What failed.
        #[source]
        source: Box<ReportsError>,
    },
    /// The reports directory is a file.
    #[error(
        "the reports directory {} is a file, not a folder; move it or set --reports-dir / TALLY_REPORTS_DIR \
         to a folder",
        .0.display()
    )]
    DirectoryIsAFile(PathBuf),
    /// The reports directory cannot be created.
    #[error("cannot create the reports directory {}", .dir.display())]
    CreateDirectory {
        /// The directory.
        dir: PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// The reports directory would be made inside a file.
    #[error(
        "the reports directory {} cannot be made: {} is a file, not a folder; set --reports-dir / \
         TALLY_REPORTS_DIR to a folder",
        .dir.display(),
        .file.display()
    )]
    InsideAFile {
        /// The directory.
        dir: PathBuf,
        /// The file on its path.
        file: PathBuf,
    },
    /// The reports directory is a symbolic link to nothing.
    #[error(
        "the reports directory {} is a symbolic link to nothing; point it at a folder or set \
         --reports-dir / TALLY_REPORTS_DIR to one",
        .0.display()
    )]
    DanglingLink(PathBuf),
    /// No file can be created in the reports directory, or, while it is
    /// still to be created, in the nearest folder on its path that exists.
    #[error(
        "{} (make it writable, or set --reports-dir / TALLY_REPORTS_DIR to a folder that is)",
        where_not_writable(.reports_dir, .dir)
    )]
    NotWritable {
        /// The reports directory.
        reports_dir: PathBuf,
        /// The folder no file can be created in: the reports directory, or
        /// while it is still to be created, the nearest one on its path.
        dir: PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// Writing a report failed.
    #[error("{0}")]
    Export(#[from] ExportError),
}

/// The start of [`ReportsError::NotWritable`]'s message: review BM found a
/// missing reports directory named by its parent's path, as if it were the
/// parent that was the reports directory.
fn where_not_writable(reports_dir: &Path, dir: &Path) -> String {
    if reports_dir == dir {
        format!("cannot write in the reports directory {}", dir.display())
    } else {
        format!(
            "cannot create the reports directory {}: no file can be created in {}, the nearest folder on its path \
             that exists",
            reports_dir.display(),
            dir.display()
        )
    }
}

/// Why the monthly reports could not be written in `dir`, found without
/// leaving anything behind: a file where the folder should be or on its
/// path, a symbolic link to nothing, or a folder (the nearest existing one,
/// while `dir` is still to be created) in which no file can be created.
/// `serve` asks at start, so that a reports directory that would fail is
/// heard of then, not at 00:05 on the 1st.
pub fn unusable_directory(dir: &Path) -> Option<ReportsError> {
    if dir.exists() && !dir.is_dir() {
        return Some(ReportsError::DirectoryIsAFile(dir.to_owned()));
    }
    if !dir.exists() && dir.symlink_metadata().is_ok() {
        return Some(ReportsError::DanglingLink(dir.to_owned()));
    }
    let existing = dir
        .ancestors()
        .map(|folder| {
            if folder.as_os_str().is_empty() {
                Path::new(".")
            } else {
                folder
            }
        })
        .find(|folder| folder.exists())?;
    if !existing.is_dir() {
        return Some(ReportsError::InsideAFile {
            dir: dir.to_owned(),
            file: existing.to_owned(),
        });
    }
    // An unnamed file (O_TMPFILE where the system has it): gone once dropped.
    tempfile::tempfile_in(existing)
        .err()
        .map(|source| ReportsError::NotWritable {
            reports_dir: dir.to_owned(),
            dir: existing.to_owned(),
            source,
        })
}

/// What a run wrote and what it left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportsOutcome {
    /// Files written.
    pub written: Vec<PathBuf>,
    /// Files that existed and were kept.
    pub kept: Vec<PathBuf>,
    /// The instant the written files are as of (None when nothing was
    /// written): both hold the entries recorded by then. Late entries may
    /// still change the month afterwards; `tally export … --as-of` this
    /// instant gives the files again.
    pub taken_at: Option<DateTime<Utc>>,
}

impl std::fmt::Display for ReportsOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |paths: &[PathBuf]| {
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(f, "wrote [{}]", names(&self.written))?;
        if let Some(at) = self.taken_at {
            write!(f, " as of {}", at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))?;
        }
        if !self.kept.is_empty() {
            write!(f, "; kept existing [{}]", names(&self.kept))?;
        }
        Ok(())
    }
}

/// The month before the one containing `now` (its first day).
pub fn previous_month(now: DateTime<Utc>) -> NaiveDate {
    month_start(now.date_naive()) - Months::new(1)
}

/// The months a run writes: every month after the newest month whose two
/// reports are in `dir`, up to `last` (last month); just `last` when `dir`
/// holds no such month or already has `last` (kept, or rewritten with
/// `overwrite`). A month with one report of two is written again (its
/// existing file kept), so a run that failed halfway loses nothing.
pub fn months_to_write(dir: &Path, last: NaiveDate) -> Vec<NaiveDate> {
    let (monthly, invoice) = report_months(dir);
    let first = match monthly.intersection(&invoice).max() {
        Some(newest) => *newest + Months::new(1),
        // None complete: from the oldest half-written month, if any.
        None => monthly.union(&invoice).min().copied().unwrap_or(last),
    };
    if first > last {
        return vec![last];
    }
    let mut months = Vec::new();
    let mut month = first;
    while month <= last {
        months.push(month);
        month = month + Months::new(1);
    }
    months
}

/// The months whose monthly report, and whose invoice report, are in `dir`.
fn report_months(dir: &Path) -> (BTreeSet<NaiveDate>, BTreeSet<NaiveDate>) {
    let mut monthly = BTreeSet::new();
    let mut invoice = BTreeSet::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match report_of(&entry.file_name().to_string_lossy()) {
            Some((Report::Monthly, month)) => monthly.insert(month),
            Some((Report::Invoice, month)) => invoice.insert(month),
            None => false,
        };
    }
    (monthly, invoice)
}

/// Whether a run is overdue at `now`: `dir` holds reports (of any month,
/// even one half written) but not both of last month's, so a scheduled run was missed (the server down on the 1st)
/// and waiting for the next 1st would leave a month's invoices out for a
/// month. An empty directory is a new deployment: its first reports come on
/// the next 1st, as scheduled.
pub fn overdue(dir: &Path, now: DateTime<Utc>) -> bool {
    let (monthly, invoice) = report_months(dir);
    let last = previous_month(now);
    let any = !monthly.is_empty() || !invoice.is_empty();
    any && !(monthly.contains(&last) && invoice.contains(&last))
}

/// The two reports of a month.
enum Report {
    Monthly,
    Invoice,
}

/// The report and month a file's name holds (`monthly-YYYY-MM.csv` or
/// `invoice-YYYY-MM.csv`).
fn report_of(name: &str) -> Option<(Report, NaiveDate)> {
    let (report, rest) = if let Some(rest) = name.strip_prefix("monthly-") {
        (Report::Monthly, rest)
    } else {
        (Report::Invoice, name.strip_prefix("invoice-")?)
    };
    let tag = rest.strip_suffix(".csv")?;
    let month = NaiveDate::parse_from_str(&format!("{tag}-01"), "%Y-%m-%d").ok()?;
    Some((report, month))
}

/// Says which temp files in `dir` a run killed outright left behind (older
/// than an hour: no run takes that long, so none is still being written).
/// Nothing removes them; an operator deletes them once seen.
fn warn_about_leftovers(dir: &Path) {
    let stale = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let old = entry.metadata().and_then(|m| m.modified()).is_ok_and(|at| at < stale);
        if name.starts_with(crate::export::TEMP_PREFIX) && old {
            let path = entry.path();
            tracing::warn!(
                path = %path.display(),
                "{} is a partial report left by a run that was killed; delete it",
                path.display()
            );
        }
    }
}

/// The job's run: writes [`months_to_write`] in order, up to `last`, and
/// says what it wrote and kept. A month that fails stops the run; those
/// before it stay written, and the next run starts from the first missing.
pub async fn catch_up(
    store: &dyn Store,
    catalog: &Catalog,
    dir: &Path,
    last: NaiveDate,
    overwrite: bool,
) -> Result<String, ReportsError> {
    warn_about_leftovers(dir);
    let mut done = Vec::new();
    for month in months_to_write(dir, last) {
        let outcome = write_monthly_reports(store, catalog, dir, month, overwrite)
            .await
            .map_err(|e| ReportsError::Month {
                month,
                source: Box::new(e),
            })?;
        done.push(format!("{}: {outcome}", month.format("%Y-%m")));
    }
    Ok(done.join("; "))
}

/// The report files of a month.
pub fn report_paths(dir: &Path, month: NaiveDate) -> (PathBuf, PathBuf) {
    let tag = month.format("%Y-%m");
    (
        dir.join(format!("monthly-{tag}.csv")),
        dir.join(format!("invoice-{tag}.csv")),
    )
}

impl ReportsOutcome {
    /// Counts `path` written, or kept when another run (another process, on
    /// SQLite, where the job's guard is per process) created it first
    /// (review AS: the run that lost the race failed, advising an
    /// `--overwrite` the job does not take). Its file holds the same month.
    fn file(&mut self, path: PathBuf, written: Result<(), ReportsError>) -> Result<(), ReportsError> {
        let created_meanwhile = match &written {
            Err(ReportsError::Export(ExportError::Exists(_))) => true,
            Err(ReportsError::Export(ExportError::Create { source, .. })) => {
                source.error.kind() == std::io::ErrorKind::AlreadyExists
            }
            _ => false,
        };
        match written {
            Ok(()) => self.written.push(path),
            Err(_) if created_meanwhile => self.kept.push(path),
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// Removes `path` when it is an empty file, with a warning. That is never a
/// report: each has at least its header, and is renamed into place whole.
/// It was kept for good as one (review BM: a file made by `touch`, or a
/// copy cut short, was "kept existing" every run). Removed rather than
/// written over, the report then goes in only where nothing is (review BN:
/// a file filled meanwhile, say an annotated report copied into place, was
/// replaced); the look and the removal are a moment apart.
fn remove_an_empty_file_in_the_way(path: &Path) {
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0) {
        return;
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::warn!(
            file = %path.display(),
            "{} was empty, so it was no report (each has at least its header): removed, to write the report in its place",
            path.display()
        ),
        Err(error) => tracing::warn!(
            file = %path.display(),
            error = %error,
            "{} is empty, so it is no report, and cannot be removed: {error}",
            path.display()
        ),
    }
}

/// Writes `month`'s monthly totals and invoices into `dir`.
pub async fn write_monthly_reports(
    store: &dyn Store,
    catalog: &Catalog,
    dir: &Path,
    month: NaiveDate,
    overwrite: bool,
) -> Result<ReportsOutcome, ReportsError> {
    // The same look as `serve`'s at start: a file in the way is named as such.
    if let Some(problem) = unusable_directory(dir) {
        return Err(problem);
    }
    std::fs::create_dir_all(dir).map_err(|source| ReportsError::CreateDirectory {
        dir: dir.to_owned(),
        source,
    })?;
    let (monthly, invoice) = report_paths(dir, month);
    // Both files as of one instant (the entries recorded by then, the plans
    // and overrides set by then): they agree with each other, and `tally
    // export … --as-of` that instant gives them again, byte for byte.
    let taken_at = Utc::now();
    let mut outcome = ReportsOutcome::default();
    remove_an_empty_file_in_the_way(&monthly);
    if overwrite || !monthly.exists() {
        let filter = ExportFilter {
            from: month,
            to: Granularity::Month.next(month),
            account: None,
            resource: None,
            as_of: Some(taken_at),
        };
        let written = async {
            let mut out = CsvOutput::file(&monthly, overwrite)?;
            export_totals(store, Granularity::Month, &filter, &mut out).await?;
            out.finish()?;
            Ok::<_, ReportsError>(())
        };
        let written = written.await;
        outcome.file(monthly, written)?;
    } else {
        outcome.kept.push(monthly);
    }
    remove_an_empty_file_in_the_way(&invoice);
    if overwrite || !invoice.exists() {
        let written = async {
            let mut out = CsvOutput::file(&invoice, overwrite)?;
            export_invoices(store, catalog, month, None, Some(taken_at), &mut out).await?;
            out.finish()?;
            Ok::<_, ReportsError>(())
        };
        let written = written.await;
        outcome.file(invoice, written)?;
    } else {
        outcome.kept.push(invoice);
    }
    outcome.taken_at = (!outcome.written.is_empty()).then_some(taken_at);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn month(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(&format!("{text}-01"), "%Y-%m-%d").unwrap()
    }

    fn touch(dir: &Path, names: &[&str]) {
        for name in names {
            std::fs::write(dir.join(name), "x").unwrap();
        }
    }

    /// /proc takes no new file, even from root.
    #[test]
    #[cfg(target_os = "linux")]
    fn a_reports_directory_that_cannot_be_created_is_named_with_the_folder_in_the_way() {
        let reports = Path::new("/proc/tally-reports");
        match unusable_directory(reports) {
            Some(ReportsError::NotWritable { reports_dir, dir, .. }) => {
                assert_eq!(reports_dir, reports);
                assert_eq!(dir, Path::new("/proc"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_reports_directory_still_to_create_is_not_named_by_its_parent() {
        let reports = Path::new("/srv/tally/reports");
        assert_eq!(
            where_not_writable(reports, reports),
            "cannot write in the reports directory /srv/tally/reports"
        );
        let said = where_not_writable(reports, Path::new("/srv"));
        assert!(
            said.starts_with("cannot create the reports directory /srv/tally/reports: no file can be created in /srv,"),
            "{said}"
        );
    }

    #[test]
    fn a_reports_directory_that_would_fail_is_found_without_writing_it() {
        let dir = tempfile::tempdir().unwrap();
        assert!(unusable_directory(&dir.path().join("reports/2026")).is_none());
        assert!(!dir.path().join("reports").exists(), "nothing created");
        let file = dir.path().join("afile");
        std::fs::write(&file, "x").unwrap();
        let is_a_file = unusable_directory(&file).expect("a file is no folder");
        assert!(is_a_file.to_string().contains("is a file, not a folder"), "{is_a_file}");
        // Under a file, the folder can never be made: the file is named.
        let under = unusable_directory(&file.join("reports/2026")).expect("no folder under a file");
        assert_eq!(
            under.to_string(),
            format!(
                "the reports directory {}/reports/2026 cannot be made: {} is a file, not a folder; set \
                 --reports-dir / TALLY_REPORTS_DIR to a folder",
                file.display(),
                file.display()
            )
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("gone"), &link).unwrap();
        let dangling = unusable_directory(&link).expect("a link to nothing");
        assert!(
            dangling.to_string().contains("is a symbolic link to nothing"),
            "{dangling}"
        );
    }

    #[test]
    fn a_directory_without_reports_gets_last_month_only() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), &["notes.txt", "monthly-2026-13.csv"]);
        assert_eq!(months_to_write(dir.path(), month("2026-10")), [month("2026-10")]);
    }

    #[test]
    fn missed_months_after_the_newest_complete_one_are_caught_up() {
        let dir = tempfile::tempdir().unwrap();
        touch(
            dir.path(),
            &[
                "monthly-2026-06.csv",
                "invoice-2026-06.csv",
                // Half written: its invoice is missing, so it is not done.
                "monthly-2026-07.csv",
            ],
        );
        assert_eq!(
            months_to_write(dir.path(), month("2026-09")),
            [month("2026-07"), month("2026-08"), month("2026-09")]
        );
        // Across a year's end.
        assert_eq!(
            months_to_write(dir.path(), month("2027-01")).last(),
            Some(&month("2027-01"))
        );
        assert_eq!(months_to_write(dir.path(), month("2027-01")).len(), 7);
    }

    #[test]
    fn a_half_written_month_with_none_complete_is_written_again_and_makes_a_run_overdue() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), &["monthly-2026-08.csv"]);
        assert_eq!(
            months_to_write(dir.path(), month("2026-09")),
            [month("2026-08"), month("2026-09")]
        );
        let now = |text: &str| DateTime::parse_from_rfc3339(text).unwrap().to_utc();
        assert!(overdue(dir.path(), now("2026-10-03T12:00:00Z")));
        touch(dir.path(), &["monthly-2026-09.csv", "invoice-2026-09.csv"]);
        assert!(!overdue(dir.path(), now("2026-10-03T12:00:00Z")));
        let empty = tempfile::tempdir().unwrap();
        assert!(!overdue(empty.path(), now("2026-10-03T12:00:00Z")), "a new deployment");
    }

    #[test]
    fn a_directory_that_has_last_month_gets_it_again_to_keep_or_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), &["monthly-2026-09.csv", "invoice-2026-09.csv"]);
        assert_eq!(months_to_write(dir.path(), month("2026-09")), [month("2026-09")]);
    }
}
