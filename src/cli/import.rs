//! `tally import FILE.csv`: bulk-load entries in the entries export format,
//! through the same validation and insert path as the HTTP API.

use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};

use crate::app::Settings;
use crate::domain::entry::{EntryRules, FieldError, Validated};
use crate::domain::{EntryInput, InsertStatus, NewEntry};
use crate::export::ledger::ENTRIES_HEADER;
use crate::store::{Store, StoreError, reversal_of, too_late_unless_recorded};

/// Rows per insert batch.
const BATCH: usize = 1_000;

/// Arguments of `tally import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// CSV with a header row; columns as in `tally export entries`
    /// (account, resource, amount, idempotency_key required; occurred_at,
    /// source, metadata, reverses, id optional; recorded_at ignored).
    /// `-` reads standard input, as `export -o -` writes standard output.
    file: PathBuf,
    /// Accept entries older than the late-arrival horizon (backfills).
    #[arg(long)]
    allow_late: bool,
}

/// What an import did.
#[derive(Debug, Default)]
pub struct ImportSummary {
    /// New ledger rows.
    pub created: usize,
    /// Rows whose key was already there with the same content.
    pub duplicates: usize,
    /// The rows refused.
    pub rejected: RejectedRows,
    /// Whether the header was read, so that rows were looked at.
    pub header_read: bool,
    /// (line, what to check) of rows that may not be what the file
    /// meant: a line break outside metadata, the mark of a double quote left
    /// open, which takes the rows after it into one field.
    pub notes: Vec<(u64, String)>,
    /// The file's ids of refused rows, with their lines: a reversal of one
    /// is told so, not to sort the file.
    pub rejected_ids: HashMap<i64, u64>,
}

/// The rows an import refused: each one counted, the first
/// [`RejectedRows::LISTED`] by line kept with their reasons. The wrong file
/// can be millions of bad rows; holding every reason would take memory in
/// proportion and print millions of lines, where the first ones already
/// show what is wrong.
#[derive(Debug, Default)]
pub struct RejectedRows {
    /// Every row refused, listed or not.
    count: usize,
    /// (line, reason) of the lowest lines refused so far; a max-heap, so
    /// that the highest line is the one dropped when a lower one comes in
    /// (row-by-row retries refuse lines out of order).
    first: BinaryHeap<(u64, String)>,
}

impl RejectedRows {
    /// How many refused rows are listed with their reasons.
    pub const LISTED: usize = 1_000;

    /// Counts the row of `line` as refused for `reason`.
    pub fn push(&mut self, line: u64, reason: String) {
        self.count += 1;
        if self.first.len() < Self::LISTED {
            self.first.push((line, reason));
        } else if self.first.peek().is_some_and(|(highest, _)| line < *highest) {
            self.first.pop();
            self.first.push((line, reason));
        }
    }

    /// Every row refused.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no row was refused.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Line breaks in `text`, as an editor counts them (CRLF is one).
fn line_breaks(text: &str) -> u64 {
    let lone_or_crlf = text.matches(['\r', '\n']).count() - text.matches("\r\n").count();
    lone_or_crlf as u64
}

/// Refuses a header with a column the import would not read (a misspelt
/// `ocurred_at` would otherwise date every row at import time), a column
/// named twice, or a required column missing.
fn check_header(file: &std::path::Path, headers: &csv::StringRecord) -> anyhow::Result<()> {
    let expected = ENTRIES_HEADER.join(",");
    let file = input_name(file);
    anyhow::ensure!(
        !headers.is_empty(),
        "{file} is empty; an import needs a header row, the entries export's: {expected}"
    );
    let mut seen = std::collections::HashSet::new();
    for name in headers {
        anyhow::ensure!(
            !name.is_empty(),
            "{file}: the header has a column without a name (a trailing comma?); \
             the columns are those of the entries export: {expected}"
        );
        anyhow::ensure!(
            ENTRIES_HEADER.contains(&name),
            "{file}: the header has a column {name:?} that the import does not know; \
             the columns are those of the entries export: {expected}"
        );
        anyhow::ensure!(
            seen.insert(name),
            "{file}: the header names the column {name:?} twice; name each column once"
        );
    }
    let required = ["account", "resource", "amount", "idempotency_key"];
    let missing: Vec<&str> = required.iter().copied().filter(|c| !seen.contains(c)).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{file}: the header lacks the column{} {}; expected the entries export header: {expected}",
        if missing.len() == 1 { "" } else { "s" },
        missing.join(", ")
    );
    Ok(())
}

/// The file's own line numbers for the records the csv reader returns. The
/// csv crate counts lines itself, but its count falls behind after CRLF
/// endings and blank lines (BurntSushi/rust-csv#395, #208), which is what
/// Excel and people write; and a record's byte offset can point at the end
/// of the line before it. So the bytes the csv reader reads pass through
/// [`LineEndsReader`], which notes where each line end is, and a record's
/// line is found from its byte offset. One pass over one stream: the file may
/// be a pipe (`/dev/stdin`), which cannot be read twice.
#[derive(Default)]
struct LineEnds {
    /// Offsets of the CR and LF bytes read and not yet passed by a record.
    pending: std::collections::VecDeque<(u64, u8)>,
    /// Bytes read so far.
    read: u64,
    /// The line the first pending byte is on (1-based).
    line: u64,
    /// The CR or LF passed last: an LF right after a CR ends no second line.
    last: Option<(u64, u8)>,
}

impl LineEnds {
    /// The line on which the record placed at byte `start` begins: past the
    /// line ends and blank lines from `start` on. Records come in stream
    /// order, so what lies before `start` is never asked for again.
    fn line_of(&mut self, start: u64) -> u64 {
        while let Some(&(offset, _)) = self.pending.front()
            && offset < start
        {
            self.pass();
        }
        // From `start` on, only line ends can come before the record's first byte.
        let mut next = start;
        while let Some(&(offset, _)) = self.pending.front()
            && offset == next
        {
            self.pass();
            next += 1;
        }
        self.line
    }

    /// The line on which a record ending at byte `end` (the reader's position
    /// after it) ends: the record's own line end (LF, CRLF or CR, or, for a
    /// field left open to the end of the file, its last line's break) closes
    /// that line and is passed with the next record.
    fn last_line_of(&mut self, end: u64) -> u64 {
        let mut own_end = end;
        for &(offset, _) in self.pending.iter().rev().skip_while(|(offset, _)| *offset >= end) {
            if offset + 1 != own_end {
                break;
            }
            own_end = offset;
        }
        while let Some(&(offset, _)) = self.pending.front()
            && offset < own_end
        {
            self.pass();
        }
        self.line
    }

    /// Passes the first pending byte. A line ends at LF, CRLF or a lone CR
    /// (old Mac files; the csv reader ends records there too), as an editor
    /// counts them.
    fn pass(&mut self) {
        let Some((offset, byte)) = self.pending.pop_front() else {
            return;
        };
        let after_cr = self.last == Some((offset.wrapping_sub(1), b'\r'));
        self.line += u64::from(byte == b'\r' || !after_cr);
        self.last = Some((offset, byte));
    }
}

/// The reader the csv reader reads through: it notes every line end in
/// [`LineEnds`], shared with the loop that names the records' lines. It also
/// drops a UTF-8 byte-order mark at the start itself: the csv reader looks for
/// one only in its first read, which on a slow pipe can hold part of it.
struct LineEndsReader<R> {
    inner: R,
    ends: std::sync::Arc<std::sync::Mutex<LineEnds>>,
    /// The stream's first bytes, read to look for a byte-order mark and not
    /// yet handed on; `None` until they have been read.
    start: Option<Vec<u8>>,
}

impl<R: Read> LineEndsReader<R> {
    fn new(inner: R, ends: std::sync::Arc<std::sync::Mutex<LineEnds>>) -> Self {
        Self {
            inner,
            ends,
            start: None,
        }
    }
}

/// UTF-8's byte-order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

impl<R: Read> Read for LineEndsReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if self.start.is_none() {
            let mut first = Vec::with_capacity(BOM.len());
            let mut byte = [0u8; 1];
            while first.len() < BOM.len() && self.inner.read(&mut byte)? == 1 {
                first.push(byte[0]);
                if !BOM.starts_with(&first) {
                    break;
                }
            }
            if first == BOM {
                first.clear();
            }
            self.start = Some(first);
        }
        let n = match self.start.as_mut() {
            Some(held) if !held.is_empty() => {
                let n = held.len().min(buffer.len());
                buffer[..n].copy_from_slice(&held[..n]);
                held.drain(..n);
                n
            }
            _ => self.inner.read(buffer)?,
        };
        let mut ends = self.ends.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let base = ends.read;
        for (i, &byte) in buffer[..n].iter().enumerate() {
            if byte == b'\r' || byte == b'\n' {
                ends.pending.push_back((base + i as u64, byte));
            }
        }
        ends.read += n as u64;
        Ok(n)
    }
}

/// Why the csv reader could not read a row, in the import's own words: the
/// csv crate's text carries its own line count, which is off (see [`LineEnds`]).
/// A row that runs over several lines says to which: a double quote left open
/// takes the lines after it into one field, and those rows are not read.
fn unreadable_row(e: &csv::Error, line: u64, last: u64) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } if last > line => format!(
            "unreadable CSV row: it runs to line {last} and has {len} field{} where the header has \
             {expected_len}; a double quote left open takes the lines after it into one field, so {} not read \
             either: close the quote and import the file again",
            if *len == 1 { "" } else { "s" },
            rows_after(line, last)
        ),
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => format!(
            "unreadable CSV row: it has {len} field{} where the header has {expected_len} \
             (a missing or extra comma, a field with a comma that is not in double quotes, or a double quote \
             left open?)",
            if *len == 1 { "" } else { "s" }
        ),
        csv::ErrorKind::Utf8 { err, .. } => format!(
            "unreadable CSV row: field {} is not UTF-8; save the file as UTF-8",
            err.field() + 1
        ),
        _ => format!("unreadable CSV row: {e}"),
    }
}

/// "the row(s) on line(s) … was/were": the lines after `line` up to `last`,
/// which a row starting on `line` took into one of its fields.
fn rows_after(line: u64, last: u64) -> String {
    if last == line + 1 {
        format!("the row on line {last} was")
    } else {
        format!("the rows on lines {} to {last} were", line + 1)
    }
}

/// [`LineEnds::line_of`] the csv reader's `position`.
fn line_at(ends: &std::sync::Mutex<LineEnds>, position: Option<&csv::Position>) -> u64 {
    let mut ends = ends.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    position.map_or(0, |p| ends.line_of(p.byte()))
}

/// [`LineEnds::last_line_of`] a record the csv reader has just read.
fn last_line_at(ends: &std::sync::Mutex<LineEnds>, end: &csv::Position) -> u64 {
    ends.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .last_line_of(end.byte())
}

struct PendingRow {
    line: u64,
    source_id: Option<i64>,
    /// The file's id of the entry this row reverses (the entry holds the ledger's).
    reverses_in_file: Option<i64>,
    entry: NewEntry,
    /// Past the late-arrival horizon: rejected so unless the ledger holds
    /// its key already (a retried import).
    too_late: Option<FieldError>,
}

/// A row's problems in one line, in the words of this command: the clock it
/// was judged by is this machine's, there is no server.
fn reasons(errors: &[FieldError]) -> String {
    let reasons: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message.replace("the server's", "this machine's")))
        .collect();
    reasons.join("; ")
}

/// Reads the file, inserts valid rows in batches and prints a summary.
/// Exit 0 when every row went in, 1 when some were rejected (the valid rows
/// are kept), 2 when the import stopped on an error (a file or header it
/// cannot read, the database): a script can tell bad rows from a failed run.
pub async fn run(settings: &Settings, args: ImportArgs) -> anyhow::Result<ExitCode> {
    let mut summary = ImportSummary::default();
    let outcome = import_file(settings, &args, &mut summary).await;
    // What went in before a stop is said too: those rows stay.
    if summary.header_read {
        print_summary(&args.file, &mut summary);
    }
    Ok(match outcome {
        Ok(()) if summary.rejected.is_empty() => ExitCode::SUCCESS,
        Ok(()) => ExitCode::from(1),
        Err(error) => {
            stderr_line!("error: {}", crate::telemetry::cause_chain(error.as_ref()));
            if summary.created > 0 {
                stderr_line!(
                    "note: the {} rows created before the import stopped stay; importing the same file \
                     again is safe (they come back as duplicates)",
                    summary.created
                );
            }
            ExitCode::from(2)
        }
    })
}

/// The summary line, then each rejected row and each note, by line.
fn print_summary(file: &std::path::Path, summary: &mut ImportSummary) {
    stderr_line!(
        "{}: {} created, {} duplicate, {} rejected",
        input_name(file),
        summary.created,
        summary.duplicates,
        summary.rejected.len()
    );
    let listed = std::mem::take(&mut summary.rejected.first).into_sorted_vec();
    let listed_count = listed.len();
    // Rejections and notes in the file's line order (a stable sort: a row's
    // rejection before its note).
    let mut lines: Vec<(u64, String)> = listed;
    lines.extend(
        std::mem::take(&mut summary.notes)
            .into_iter()
            .map(|(line, check)| (line, format!("note: {check}"))),
    );
    lines.sort_by_key(|(line, _)| *line);
    for (line, text) in &lines {
        stderr_line!("  line {line}: {text}");
    }
    if summary.rejected.len() > listed_count {
        stderr_line!(
            "  … and {} more rejected rows, not listed (the first {} by line are); mend those and import \
             the file again: the rows created come back as duplicates",
            summary.rejected.len() - listed_count,
            listed_count
        );
    }
}

/// How messages name the input: its path, or "standard input" for `-`.
fn input_name(file: &Path) -> String {
    if file == Path::new("-") {
        "standard input".to_owned()
    } else {
        file.display().to_string()
    }
}

/// Standard input as a file: a duplicate of descriptor 0, read from where
/// it stands. Reopening `/dev/stdin` fails when it is a socket (systemd's
/// `StandardInput=socket`) and starts a file already partly read over from
/// its first byte (review BN).
#[cfg(unix)]
fn standard_input() -> anyhow::Result<File> {
    use std::os::fd::AsFd as _;
    let descriptor = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("cannot read standard input")?;
    Ok(File::from(descriptor))
}

/// Standard input as a file (Unix only).
#[cfg(not(unix))]
fn standard_input() -> anyhow::Result<File> {
    anyhow::bail!("tally import - reads standard input on Unix only; give the CSV file's path")
}

/// [`run`]'s work, counted in `summary`, or the error that stopped it.
async fn import_file(settings: &Settings, args: &ImportArgs, summary: &mut ImportSummary) -> anyhow::Result<()> {
    let name = input_name(&args.file);
    // `-` is standard input, as for `export -o -` (review BM: it was taken
    // for a file named `-`).
    let file = if args.file == Path::new("-") {
        standard_input()?
    } else {
        File::open(&args.file).with_context(|| format!("cannot open {name}"))?
    };
    // Linux opens a folder for reading; only the first read fails ("Is a
    // directory"), far from the path (review AQ).
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        anyhow::bail!("{name} is a folder; give tally import a CSV file");
    }
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let progress = ProgressBar::new(size)
        .with_style(ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}").expect("valid template"));
    let line_ends = std::sync::Arc::new(std::sync::Mutex::new(LineEnds {
        line: 1,
        ..LineEnds::default()
    }));
    let mut reader = csv::Reader::from_reader(LineEndsReader::new(progress.wrap_read(file), line_ends.clone()));
    let headers = match reader.headers() {
        Ok(headers) => headers.clone(),
        Err(e) => match e.kind() {
            // The csv crate's words count fields from 0.
            csv::ErrorKind::Utf8 { err, .. } => anyhow::bail!(
                "{}: the header row is not UTF-8 (column {}); save the file as UTF-8",
                name,
                err.field() + 1
            ),
            _ => {
                return Err(anyhow::Error::new(e).context(format!("cannot read the CSV header row of {name}")));
            }
        },
    };
    let column = |name: &str| headers.iter().position(|h| h == name);
    check_header(&args.file, &headers)?;
    // Opened once the file and its header are known good: a refused file
    // leaves no new SQLite file behind.
    let (store, catalog) = settings.open_store().await?;
    let rules = EntryRules {
        catalog: &catalog,
        now: Utc::now(),
        late_horizon: chrono::Duration::days(settings.late_horizon_days),
        allow_late: args.allow_late,
        // The import itself is the backfill, with the flag.
        too_late: "; import it with --allow-late to backfill rows that old",
    };

    summary.header_read = true;
    // Ids in the file → ids in this ledger, so `reverses` follows its target
    // (None: rows of several lines hold that id, so it names none of them).
    let mut id_map: HashMap<i64, Option<i64>> = HashMap::new();
    let mut batch: Vec<PendingRow> = Vec::with_capacity(BATCH);
    // `read_record`, not `records()`: a row the reader cannot read is
    // reported with the line it ends on, which is the reader's position.
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            // The file itself failed: what follows was never read.
            Err(e) if e.is_io_error() => {
                let line = line_ends.lock().unwrap_or_else(std::sync::PoisonError::into_inner).line;
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot read {name} after line {line}; the rows after it were not imported"
                )));
            }
            Err(e) => {
                let line = line_at(&line_ends, e.position());
                let last = last_line_at(&line_ends, reader.position());
                summary.rejected.push(line, unreadable_row(&e, line, last));
                continue;
            }
        }
        let line = line_at(&line_ends, record.position());
        // The line the row ends on. A field left open to the end of the file
        // ends with the last line's break.
        let last = line
            + record
                .iter()
                .map(|value| line_breaks(value.trim_end_matches(['\r', '\n'])))
                .sum::<u64>();
        if let Some((name, _)) = headers
            .iter()
            .zip(record.iter())
            .find(|(name, value)| *name != "metadata" && value.contains(['\r', '\n']))
        {
            summary.notes.push((
                line,
                format!(
                    "{name} holds a line break, so this row runs to line {last}; if a double quote was left \
                     open there, the rows on those lines went into that field: check the file"
                ),
            ));
        }
        let field = |name: &str| column(name).and_then(|i| record.get(i)).filter(|v| !v.is_empty());
        let metadata = match field("metadata")
            .map(serde_json::from_str::<serde_json::Value>)
            .transpose()
        {
            Ok(m) => m,
            // JSON may span lines (pretty-printed), so metadata's line
            // breaks are only suspect when it does not parse.
            Err(e) if last > line => {
                summary.rejected.push(
                    line,
                    format!(
                        "metadata is not JSON: {e} of the field, which runs to line {last}; if a double quote was \
                         left open there, {} taken into it and not imported: close the quote and import the file \
                         again",
                        rows_after(line, last)
                    ),
                );
                continue;
            }
            Err(e) => {
                summary
                    .rejected
                    .push(line, format!("metadata is not JSON: {e} of the field"));
                continue;
            }
        };
        let input = EntryInput {
            account: field("account").map(str::to_owned),
            resource: field("resource").map(str::to_owned),
            amount: field("amount").map(|a| serde_json::value::to_raw_value(a).expect("a string is JSON")),
            idempotency_key: field("idempotency_key").map(str::to_owned),
            occurred_at: field("occurred_at").map(str::to_owned),
            source: field("source").map(str::to_owned),
            metadata,
        };
        // Both name rows of this file by the ids `tally export entries` wrote.
        let entry_id = |name: &str| match field(name) {
            None => Ok(None),
            Some(value) => value.parse::<i64>().map(Some).map_err(|e| {
                let why = match e.kind() {
                    std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => {
                        "ids fit 64 bits (at most 9223372036854775807)"
                    }
                    _ => "ids are whole numbers",
                };
                format!("{name} '{value}' is not an entry id; {why}, as `tally export entries` writes them")
            }),
        };
        let (source_id, reverses) = match (entry_id("id"), entry_id("reverses")) {
            (Ok(id), Ok(reverses)) => (id, reverses),
            (Err(reason), _) | (_, Err(reason)) => {
                summary.rejected.push(line, reason);
                continue;
            }
        };
        let (mut entry, too_late) = match input.validate_apart_from_horizon(0, rules) {
            Ok(Validated::Valid(entry)) => (entry, None),
            // A row imported by an earlier run, within the horizon then, is
            // a duplicate now, as any retry (review AP): its batch asks the
            // ledger for all such rows at once before it is written.
            Ok(Validated::OnlyTooLate(entry, late)) => (entry, Some(late)),
            Err(errors) => {
                summary.rejected.push(line, reasons(&errors));
                if let Some(id) = source_id {
                    summary.rejected_ids.insert(id, line);
                }
                continue;
            }
        };
        if let Some(target) = reverses {
            // The target may be in the batch not yet written: write it first.
            if batch.iter().any(|row| row.source_id == Some(target)) {
                flush(store.as_ref(), &mut batch, &mut id_map, summary).await?;
            }
            // Only a target imported from this file: a raw id from another ledger
            // would point at an unrelated row here and take its one reversal.
            let mapped = match id_map.get(&target) {
                Some(&Some(mapped)) => mapped,
                Some(None) => {
                    summary.rejected.push(
                        line,
                        format!(
                            "reverses {target}, but several rows imported from this file have id {target}, so \
                             it names none of them; give each row of the file its own id"
                        ),
                    );
                    continue;
                }
                None => {
                    let why = match summary.rejected_ids.get(&target) {
                        // Review AT: refused rows are not missing rows.
                        Some(refused) => format!(
                            "reverses {target}, whose row (line {refused}) was rejected; correct that row and import \
                             the file again (the rows already in count as duplicates)"
                        ),
                        None => format!(
                            "reverses {target}, which is not an entry imported from this file before this line; \
                             a reversal must come after the entry it reverses (sort the file by id)"
                        ),
                    };
                    summary.rejected.push(line, why);
                    continue;
                }
            };
            // The same rules as the API's reversal: the opposite of an entry
            // that is not itself a reversal, in the same account, resource
            // and bucket.
            let original = store.entry(mapped).await?;
            let expected = match reversal_of(&original, entry.idempotency_key.clone(), None) {
                Ok(expected) => expected,
                // reversal_of's words name ledger ids; the reader of this
                // report knows the file's.
                Err(_) if original.reverses.is_some() => {
                    summary.rejected.push(
                        line,
                        format!(
                            "reverses {target}, which is itself a reversal; a reversal cannot be reversed: \
                             post a new entry instead"
                        ),
                    );
                    continue;
                }
                Err(refused) => {
                    summary.rejected.push(line, refused.to_string());
                    continue;
                }
            };
            if (&entry.account, &entry.resource, entry.amount, entry.occurred_at)
                != (
                    &expected.account,
                    &expected.resource,
                    expected.amount,
                    expected.occurred_at,
                )
            {
                summary.rejected.push(
                    line,
                    format!(
                        "reverses {target}, but a reversal of it is {} {} {} at {}; this row has {} {} {} at {}",
                        expected.account,
                        expected.resource,
                        expected.amount,
                        expected
                            .occurred_at
                            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                        entry.account,
                        entry.resource,
                        entry.amount,
                        entry.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                    ),
                );
                continue;
            }
            entry.reverses = Some(mapped);
        }
        batch.push(PendingRow {
            line,
            source_id,
            reverses_in_file: reverses,
            entry,
            too_late,
        });
        if batch.len() >= BATCH {
            flush(store.as_ref(), &mut batch, &mut id_map, summary).await?;
        }
    }
    flush(store.as_ref(), &mut batch, &mut id_map, summary).await?;
    progress.finish_and_clear();
    Ok(())
}

/// Inserts a batch. A batch the store refuses as a whole (a conflicting key, a
/// second reversal) is retried row by row, so that only the bad rows are rejected.
async fn flush(
    store: &dyn Store,
    batch: &mut Vec<PendingRow>,
    id_map: &mut HashMap<i64, Option<i64>>,
    summary: &mut ImportSummary,
) -> anyhow::Result<()> {
    // Rows past the horizon whose keys the ledger does not hold: too late.
    let too_late: Vec<FieldError> = batch
        .iter()
        .enumerate()
        .filter_map(|(index, row)| row.too_late.clone().map(|late| FieldError { index, ..late }))
        .collect();
    if !too_late.is_empty() {
        let entries: Vec<NewEntry> = batch.iter().map(|r| r.entry.clone()).collect();
        let refused = too_late_unless_recorded(store, &entries, too_late).await?;
        let mut refused_rows = vec![false; batch.len()];
        for late in refused {
            refused_rows[late.index] = true;
            let row = &batch[late.index];
            summary.rejected.push(row.line, reasons(std::slice::from_ref(&late)));
            if let Some(id) = row.source_id {
                summary.rejected_ids.insert(id, row.line);
            }
        }
        let mut refused_rows = refused_rows.into_iter();
        batch.retain(|_| !refused_rows.next().unwrap_or(false));
    }
    if batch.is_empty() {
        return Ok(());
    }
    let entries: Vec<NewEntry> = batch.iter().map(|r| r.entry.clone()).collect();
    match store.insert_entries(&entries).await {
        Ok(outcomes) => {
            for (row, outcome) in batch.iter().zip(outcomes) {
                record(row, outcome.id, outcome.status, id_map, summary);
            }
        }
        Err(StoreError::Unavailable(e)) => return Err(e).context("the database became unavailable during the import"),
        Err(_) => {
            for row in batch.iter() {
                match store.insert_entry(&row.entry).await {
                    Ok(outcome) => record(row, outcome.id, outcome.status, id_map, summary),
                    Err(StoreError::Unavailable(e)) => {
                        return Err(e).context("the database became unavailable during the import");
                    }
                    Err(StoreError::Internal(e)) => {
                        summary.rejected.push(row.line, format!("refused by the database: {e}"))
                    }
                    // The store names ledger ids; the reader of this report knows the file's.
                    Err(StoreError::AlreadyReversed(ledger_id)) => {
                        let named = row
                            .reverses_in_file
                            .map_or_else(|| format!("entry {ledger_id}"), |id| format!("id {id}"));
                        summary.rejected.push(row.line, crate::store::already_reversed(&named));
                    }
                    Err(e) => summary.rejected.push(row.line, e.to_string()),
                }
            }
        }
    }
    batch.clear();
    Ok(())
}

fn record(
    row: &PendingRow,
    id: i64,
    status: InsertStatus,
    id_map: &mut HashMap<i64, Option<i64>>,
    summary: &mut ImportSummary,
) {
    match status {
        InsertStatus::Created => summary.created += 1,
        InsertStatus::Duplicate => summary.duplicates += 1,
    }
    if let Some(source_id) = row.source_id {
        // A second row with the id, unless it is the same entry again (a
        // repeated line), makes it name none of them.
        id_map
            .entry(source_id)
            .and_modify(|held| {
                if *held != Some(id) {
                    *held = None;
                }
            })
            .or_insert(Some(id));
    }
}
