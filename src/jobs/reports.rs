//! The monthly reports job: on the 1st, last month's monthly totals and
//! invoice CSVs land in the reports directory, written atomically (temp file,
//! then rename) and never over an existing report unless the job says so.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Months, NaiveDate, Utc};

use crate::domain::Catalog;
use crate::domain::period::{Granularity, month_start};
use crate::export::CsvOutput;
use crate::export::invoice::export_invoices;
use crate::export::ledger::export_totals;
use crate::store::{ExportFilter, Store};

/// What a run wrote and what it left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportsOutcome {
    /// Files written.
    pub written: Vec<PathBuf>,
    /// Files that existed and were kept.
    pub kept: Vec<PathBuf>,
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

/// The report files of a month.
pub fn report_paths(dir: &Path, month: NaiveDate) -> (PathBuf, PathBuf) {
    let tag = month.format("%Y-%m");
    (
        dir.join(format!("monthly-{tag}.csv")),
        dir.join(format!("invoice-{tag}.csv")),
    )
}

/// Writes `month`'s monthly totals and invoices into `dir`.
pub async fn write_monthly_reports(
    store: &dyn Store,
    catalog: &Catalog,
    dir: &Path,
    month: NaiveDate,
    overwrite: bool,
) -> anyhow::Result<ReportsOutcome> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create the reports directory {}: {e}", dir.display()))?;
    let (monthly, invoice) = report_paths(dir, month);
    let mut outcome = ReportsOutcome::default();
    if overwrite || !monthly.exists() {
        let filter = ExportFilter {
            from: month,
            to: Granularity::Month.next(month),
            account: None,
            resource: None,
            as_of: None,
        };
        let mut out = CsvOutput::file(&monthly, overwrite)?;
        export_totals(store, Granularity::Month, &filter, &mut out).await?;
        out.finish()?;
        outcome.written.push(monthly);
    } else {
        outcome.kept.push(monthly);
    }
    if overwrite || !invoice.exists() {
        let mut out = CsvOutput::file(&invoice, overwrite)?;
        export_invoices(store, catalog, month, None, None, &mut out).await?;
        out.finish()?;
        outcome.written.push(invoice);
    } else {
        outcome.kept.push(invoice);
    }
    Ok(outcome)
}
