//! CSV exports for analysts and finance: the ledger, daily and monthly totals,
//! and invoices. Streamed (memory stays flat), written atomically (a temp file
//! in the destination's folder, renamed when complete, so an error never
//! leaves a partial file), exact decimals as plain strings.

pub mod format;
pub mod invoice;
pub mod ledger;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where an export goes. Lines are formatted by [`format`] (by the stores for
/// ledger and totals exports) and arrive here as whole lines.
pub struct CsvOutput {
    writer: Box<dyn Write + Send>,
    file: Option<(tempfile::TempPath, PathBuf, bool)>,
    progress: Option<ProgressBar>,
    rows: u64,
    line: Vec<u8>,
}

impl CsvOutput {
    /// Standard output.
    pub fn stdout() -> Self {
        Self::new(
            Box::new(std::io::BufWriter::with_capacity(1 << 16, std::io::stdout())),
            None,
        )
    }

    /// A file, written to a temp file beside it and renamed into place by
    /// [`CsvOutput::finish`]. With `overwrite` false an existing file is an error.
    pub fn file(path: &Path, overwrite: bool) -> anyhow::Result<Self> {
        if !overwrite && path.exists() {
            anyhow::bail!("{} exists; pass --overwrite to replace it", path.display());
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let temp = tempfile::Builder::new()
            .prefix(".tally-export-")
            .tempfile_in(&dir)
            .with_context(|| format!("cannot write in {} (for {})", dir.display(), path.display()))?;
        let (file, temp_path) = temp.into_parts();
        let writer = Box::new(std::io::BufWriter::with_capacity(1 << 16, file));
        Ok(Self::new(writer, Some((temp_path, path.to_owned(), overwrite))))
    }

    /// Standard output, or `path` when given.
    pub fn to(path: Option<&Path>, overwrite: bool) -> anyhow::Result<Self> {
        match path {
            Some(path) => Self::file(path, overwrite),
            None => Ok(Self::stdout()),
        }
    }

    fn new(writer: Box<dyn Write + Send>, file: Option<(tempfile::TempPath, PathBuf, bool)>) -> Self {
        Self {
            writer,
            file,
            progress: None,
            rows: 0,
            line: Vec::new(),
        }
    }

    /// Shows a row counter on stderr: when stderr is a terminal, or always with `force`.
    pub fn with_progress(mut self, force: bool) -> Self {
        let target = if force {
            ProgressDrawTarget::stderr_with_hz(4)
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(None, target).with_style(
            ProgressStyle::with_template("{spinner} {human_pos} rows ({per_sec})").expect("valid template"),
        );
        if !bar.is_hidden() || force {
            self.progress = Some(bar);
        }
        self
    }

    /// Writes the header row.
    pub fn header(&mut self, columns: &[&str]) -> anyhow::Result<()> {
        self.record(columns).context("cannot write the CSV header")
    }

    /// Writes one row (RFC 4180 quoting: [`format::push_field`]).
    pub fn row<I, T>(&mut self, fields: I) -> anyhow::Result<()>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<[u8]>,
    {
        self.record(fields).context("cannot write a CSV row")?;
        self.counted(1);
        Ok(())
    }

    fn record<I, T>(&mut self, fields: I) -> std::io::Result<()>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<[u8]>,
    {
        self.line.clear();
        for (i, field) in fields.into_iter().enumerate() {
            if i > 0 {
                self.line.push(b',');
            }
            format::push_field(&mut self.line, field.as_ref());
        }
        self.line.push(b'\n');
        self.writer.write_all(&self.line)
    }

    fn counted(&mut self, rows: u64) {
        let before = self.rows;
        self.rows += rows;
        if before / 4096 != self.rows / 4096 {
            if let Some(bar) = &self.progress {
                bar.set_position(self.rows);
            }
        }
    }

    /// Rows written so far (header excluded).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Flushes and, for a file, moves it into place. Until this returns Ok no
    /// file appears at the destination.
    pub fn finish(self) -> anyhow::Result<u64> {
        let rows = self.rows;
        if let Some(bar) = &self.progress {
            bar.finish_and_clear();
        }
        let mut writer = self.writer;
        writer.flush().context("cannot flush the CSV")?;
        drop(writer);
        if let Some((temp, dest, overwrite)) = self.file {
            if overwrite {
                temp.persist(&dest)
                    .with_context(|| format!("cannot move the export into {}", dest.display()))?;
            } else {
                temp.persist_noclobber(&dest)
                    .with_context(|| format!("cannot create {} (it may exist; pass --overwrite)", dest.display()))?;
            }
        }
        Ok(rows)
    }
}

impl crate::store::CsvSink for CsvOutput {
    fn write_lines(&mut self, lines: &[u8], rows: u64) -> std::io::Result<()> {
        self.writer.write_all(lines)?;
        self.counted(rows);
        Ok(())
    }
}
