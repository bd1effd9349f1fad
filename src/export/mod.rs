//! CSV exports for analysts and finance: the ledger, daily and monthly totals,
//! and invoices. Streamed (memory stays flat), written atomically (a temp file
//! in the destination's folder, renamed when complete, so an error never
//! leaves a partial file), exact decimals as plain strings.

pub mod format;
pub mod invoice;
pub mod ledger;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::store::StoreError;

/// What can go wrong writing an export: its destination, the database
/// behind it, or the writing itself.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the database failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The store's part of an export (its CSV lines) failed.
    #[error("{0}")]
    Lines(#[from] crate::store::StreamError),
    /// An invoice period that is not a month (its first day).
    #[error("an invoice period is a month; got {0}")]
    NotAMonth(NaiveDate),
    /// A symbolic link on the way to the destination cannot be read.
    #[error("cannot read the link {}", .link.display())]
    Link {
        /// The link.
        link: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// The destination's symbolic links go round in a loop.
    #[error("{} is a loop of symbolic links; give -o a file path", .0.display())]
    LinkLoop(PathBuf),
    /// The destination is a folder.
    #[error("{} is a folder; give -o a file path in it", .0.display())]
    Folder(PathBuf),
    /// The destination is a device, pipe or socket.
    #[error(
        "{} is not a regular file (a device, pipe or socket); leave -o out (or give -o -) to write to standard output",
        .0.display()
    )]
    NotAFile(PathBuf),
    /// The destination exists and may not be replaced.
    #[error("{} exists; pass --overwrite to replace it", .0.display())]
    Exists(PathBuf),
    /// The destination's folder does not exist.
    #[error("the folder {} does not exist (for {}); create it first", .dir.display(), .path.display())]
    NoFolder {
        /// The folder.
        dir: PathBuf,
        /// The destination.
        path: PathBuf,
    },
    /// What should be the destination's folder is a file.
    #[error("{} is a file, not a folder (for {}); give -o a path in a folder", .dir.display(), .path.display())]
    NotAFolder {
        /// The file in the folder's place.
        dir: PathBuf,
        /// The destination.
        path: PathBuf,
    },
    /// The temp file beside the destination cannot be created.
    #[error(
        "cannot create a file in {} (for {}); give -o a path in a folder you can write to",
        .dir.display(),
        .path.display()
    )]
    TempFile {
        /// The destination's folder.
        dir: PathBuf,
        /// The destination.
        path: PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// The header row cannot be written.
    #[error("cannot write the CSV header")]
    Header(#[source] std::io::Error),
    /// A row cannot be written.
    #[error("cannot write a CSV row")]
    Row(#[source] std::io::Error),
    /// The rows written cannot be flushed.
    #[error("cannot flush the CSV")]
    Flush(#[source] std::io::Error),
    /// The temp file cannot be written to disk.
    #[error("cannot write the export to disk ({})", .path.display())]
    Sync {
        /// The destination.
        path: PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// The temp file cannot replace the destination (`--overwrite`).
    #[error("cannot move the export into {}", .path.display())]
    Replace {
        /// The destination.
        path: PathBuf,
        /// Why not.
        #[source]
        source: tempfile::PathPersistError,
    },
    /// The temp file cannot become the destination, which must not exist.
    #[error("cannot create {} (it may exist; pass --overwrite)", .path.display())]
    Create {
        /// The destination.
        path: PathBuf,
        /// Why not.
        #[source]
        source: tempfile::PathPersistError,
    },
    /// The destination's folder cannot be written to disk after the rename.
    #[error("cannot write the folder {} to disk", .dir.display())]
    SyncFolder {
        /// The folder.
        dir: PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
}

/// Why a file cannot be created, in the system's words for the usual
/// kinds: Rust's own ("entity not found") read oddly to an analyst.
fn kind_in_words(kind: std::io::ErrorKind) -> String {
    use std::io::ErrorKind;
    match kind {
        ErrorKind::NotFound => "no such file or directory (the folder takes no new files)".to_owned(),
        ErrorKind::PermissionDenied => "permission denied".to_owned(),
        ErrorKind::ReadOnlyFilesystem => "read-only file system".to_owned(),
        ErrorKind::StorageFull => "no space left on the device".to_owned(),
        ErrorKind::QuotaExceeded => "disk quota exceeded".to_owned(),
        other => other.to_string(),
    }
}

/// A file export's temp file and where it goes when complete.
struct Destination {
    /// The temp file beside the destination (removed if never persisted).
    temp: tempfile::TempPath,
    /// A handle on it, to reach the disk before the rename.
    handle: std::fs::File,
    /// The destination path.
    path: PathBuf,
    /// Its folder, to reach the disk after the rename.
    dir: PathBuf,
    /// Whether an existing destination is replaced.
    overwrite: bool,
}

/// How the row counter shows on stderr.
enum Progress {
    /// Drawn in place on a terminal.
    Bar(ProgressBar),
    /// A line a second, and one with the total at the end, for a log or a
    /// pipe (where indicatif draws nothing, and its own line mode would
    /// start with a burst of its redraw budget).
    Lines {
        /// When the export began.
        started: Instant,
        /// When the last line was written.
        last_line: Instant,
    },
}

/// A counter line: `12345 rows after 3.0 s`, the same every second and at the end.
/// How the temp files of exports in progress begin: a process killed
/// outright leaves one behind (docs/reports.md).
pub const TEMP_PREFIX: &str = ".tally-export-";

/// The file `path` names once its symlinks are followed (the link's target,
/// even one not created yet), so that the rename into place replaces the
/// target rather than the link.
pub(crate) fn through_symlinks(path: &Path) -> Result<PathBuf, ExportError> {
    let mut path = path.to_owned();
    // As many links as Linux follows (ELOOP past 40).
    for _ in 0..40 {
        if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Ok(path);
        }
        let target = std::fs::read_link(&path).map_err(|source| ExportError::Link {
            link: path.clone(),
            source,
        })?;
        path = match path.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    Err(ExportError::LinkLoop(path))
}

fn progress_line(rows: u64, elapsed: Duration) -> String {
    let noun = if rows == 1 { "row" } else { "rows" };
    format!("{rows} {noun} after {:.1} s", elapsed.as_secs_f64())
}

/// Where an export goes. Lines are formatted by [`format`](mod@format) (by the stores for
/// ledger and totals exports) and arrive here as whole lines.
pub struct CsvOutput {
    writer: Box<dyn Write + Send>,
    file: Option<Destination>,
    progress: Option<Progress>,
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
    pub fn file(path: &Path, overwrite: bool) -> Result<Self, ExportError> {
        // Said before anything is read: a folder cannot be replaced by a file.
        if path.is_dir() {
            return Err(ExportError::Folder(path.to_owned()));
        }
        // Renaming a temp file over a device or a pipe (/dev/stdout) would
        // replace the device node itself.
        if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
            return Err(ExportError::NotAFile(path.to_owned()));
        }
        // A symlink stays a symlink: the export replaces the file it points to.
        let path = &through_symlinks(path)?;
        if !overwrite && path.exists() {
            return Err(ExportError::Exists(path.to_owned()));
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        // A file where the folder, or a folder above it, should be: the
        // nearest existing part of the path says whether one can be made.
        if let Some(file) = dir.ancestors().find(|part| part.exists()).filter(|part| !part.is_dir()) {
            return Err(ExportError::NotAFolder {
                dir: file.to_owned(),
                path: path.to_owned(),
            });
        }
        if !dir.is_dir() {
            return Err(ExportError::NoFolder {
                dir,
                path: path.to_owned(),
            });
        }
        let mut builder = tempfile::Builder::new();
        builder.prefix(TEMP_PREFIX);
        // tempfile creates 0600; a report is read by others (finance), so
        // ask for 0666 and let the umask decide, as for any new file.
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
        // The temp file's own name would only puzzle the reader: say the
        // folder, and of the error only its kind. (tempfile keeps the
        // system's own error behind a private type, with that name.)
        let temp = builder.tempfile_in(&dir).map_err(|e| ExportError::TempFile {
            dir: dir.clone(),
            path: path.to_owned(),
            source: std::io::Error::new(e.kind(), kind_in_words(e.kind())),
        })?;
        let (file, temp) = temp.into_parts();
        let handle = file.try_clone().map_err(|source| ExportError::TempFile {
            dir: dir.clone(),
            path: path.to_owned(),
            source,
        })?;
        let writer = Box::new(std::io::BufWriter::with_capacity(1 << 16, file));
        Ok(Self::new(
            writer,
            Some(Destination {
                temp,
                handle,
                path: path.to_owned(),
                dir,
                overwrite,
            }),
        ))
    }

    /// Standard output, or `path` when given (`-` or `/dev/stdout` meaning
    /// standard output, as for most command-line tools: the latter,
    /// followed, is the device, the pipe or the file stdout is redirected to,
    /// none of which the rename into place may replace).
    pub fn to(path: Option<&Path>, overwrite: bool) -> Result<Self, ExportError> {
        match path {
            Some(path) if path != Path::new("-") && path != Path::new("/dev/stdout") => Self::file(path, overwrite),
            _ => Ok(Self::stdout()),
        }
    }

    fn new(writer: Box<dyn Write + Send>, file: Option<Destination>) -> Self {
        Self {
            writer,
            file,
            progress: None,
            rows: 0,
            line: Vec::new(),
        }
    }

    /// Shows a row counter on stderr: drawn in place when stderr is a
    /// terminal; with `force` and no terminal (a log, a pipe), as a line a
    /// second and a last one at the end, since indicatif draws nothing there.
    pub fn with_progress(mut self, force: bool) -> Self {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
                ProgressStyle::with_template("{spinner} {human_pos} rows ({per_sec})").expect("valid template"),
            );
            self.progress = Some(Progress::Bar(bar));
        } else if force {
            let now = Instant::now();
            self.progress = Some(Progress::Lines {
                started: now,
                last_line: now,
            });
        }
        self
    }

    /// Writes the header row.
    pub fn header(&mut self, columns: &[&str]) -> Result<(), ExportError> {
        self.record(columns).map_err(ExportError::Header)
    }

    /// Writes one row (RFC 4180 quoting: `format::push_field`).
    pub fn row<I, T>(&mut self, fields: I) -> Result<(), ExportError>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<[u8]>,
    {
        self.record(fields).map_err(ExportError::Row)?;
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
            match &mut self.progress {
                Some(Progress::Bar(bar)) => bar.set_position(self.rows),
                Some(Progress::Lines { started, last_line }) if last_line.elapsed() >= Duration::from_secs(1) => {
                    *last_line = Instant::now();
                    stderr_line!("{}", progress_line(self.rows, started.elapsed()));
                }
                _ => {}
            }
        }
    }

    /// Rows written so far (header excluded).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Flushes and, for a file, moves it into place. Until this returns Ok no
    /// file appears at the destination.
    pub fn finish(self) -> Result<u64, ExportError> {
        let rows = self.rows;
        match &self.progress {
            Some(Progress::Bar(bar)) => bar.finish_and_clear(),
            // The whole count: a short export may have written no line yet.
            Some(Progress::Lines { started, .. }) => stderr_line!("{}", progress_line(rows, started.elapsed())),
            None => {}
        }
        let mut writer = self.writer;
        writer.flush().map_err(ExportError::Flush)?;
        drop(writer);
        if let Some(file) = self.file {
            // On the disk before the rename, and the rename on the disk after
            // it: a power cut then leaves the old file or the whole new one,
            // never a renamed empty one (the reports job would take it as
            // written and never write that month again).
            file.handle.sync_all().map_err(|source| ExportError::Sync {
                path: file.path.clone(),
                source,
            })?;
            let dest = &file.path;
            if file.overwrite {
                file.temp.persist(dest).map_err(|source| ExportError::Replace {
                    path: dest.clone(),
                    source,
                })?;
            } else {
                file.temp
                    .persist_noclobber(dest)
                    .map_err(|source| ExportError::Create {
                        path: dest.clone(),
                        source,
                    })?;
            }
            std::fs::File::open(&file.dir)
                .and_then(|dir| dir.sync_all())
                .map_err(|source| ExportError::SyncFolder {
                    dir: file.dir.clone(),
                    source,
                })?;
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
