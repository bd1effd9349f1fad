//! Ledger entries: what clients send ([`EntryInput`]), what is validated for
//! the store ([`NewEntry`]) and what the ledger holds ([`Entry`]).

use std::borrow::Cow;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::amount::{AmountError, JsonDecimalError, MAX_DECIMALS, json_decimal_text, not_a_decimal};
use super::{AccountId, Amount, Catalog, IdempotencyKey, ResourceName, shown};

/// The most bytes an entry's metadata may take, as compact JSON.
pub const MAX_METADATA_BYTES: usize = 4096;
/// How far ahead of now `occurred_at` may be.
pub const MAX_CLOCK_SKEW: Duration = Duration::minutes(5);
/// The default late-arrival horizon.
pub const DEFAULT_LATE_HORIZON_DAYS: i64 = 35;

/// An entry as a client sends it, before validation. Required fields are
/// optional here so that a missing one is reported per field (422), not as a
/// malformed body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryInput {
    /// Account id.
    pub account: Option<String>,
    /// Resource name.
    pub resource: Option<String>,
    /// A JSON string or number, kept as written so it is parsed exactly.
    pub amount: Option<Box<RawValue>>,
    /// Client-chosen key, unique per account.
    pub idempotency_key: Option<String>,
    /// RFC 3339; defaults to now.
    pub occurred_at: Option<String>,
    /// Free text naming the sender.
    pub source: Option<String>,
    /// A JSON object of at most 4 KiB.
    pub metadata: Option<serde_json::Value>,
}

/// One validation problem, located by the entry's index and field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Index of the entry in the request (0 for a single entry).
    pub index: usize,
    /// The field at fault.
    pub field: &'static str,
    /// A machine-readable code (`unknown_resource`, `in_future`, `too_late`, `invalid`, `missing`).
    pub code: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

/// The rules an entry is validated against.
#[derive(Debug, Clone, Copy)]
pub struct EntryRules<'a> {
    /// The catalog that declares resources and their precision.
    pub catalog: &'a Catalog,
    /// The instant the request is judged at.
    pub now: DateTime<Utc>,
    /// Entries older than this are refused (`too_late`) unless `allow_late`.
    pub late_horizon: Duration,
    /// Backfills (`tally import --allow-late`) skip the horizon.
    pub allow_late: bool,
    /// What an entry older than the horizon is told to do, after the
    /// refusal ([`BACKFILL`] for entries; a consume has its own words).
    pub too_late: &'static str,
}

/// A validated entry, ready for the store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEntry {
    /// Account id.
    pub account: AccountId,
    /// Declared resource.
    pub resource: ResourceName,
    /// Exact amount in the resource's precision.
    pub amount: Amount,
    /// Idempotency key.
    pub idempotency_key: IdempotencyKey,
    /// When the usage happened (UTC, microseconds).
    pub occurred_at: DateTime<Utc>,
    /// Whether the client named `occurred_at`; a retry that leaves it out must
    /// not conflict with the first post's defaulted "now".
    pub occurred_at_given: bool,
    /// Free text naming the sender.
    pub source: Option<String>,
    /// Compact JSON object text.
    pub metadata: Option<String>,
    /// The entry this one reverses.
    pub reverses: Option<i64>,
}

impl NewEntry {
    /// Whether `existing` (stored under the same key) records the same usage.
    /// Resource, amount and, if the client gave one, occurred_at must match.
    pub fn same_content_as(&self, existing: &Entry) -> bool {
        self.resource == existing.resource
            && self.amount == existing.amount
            && (!self.occurred_at_given || self.occurred_at == existing.occurred_at)
    }
}

/// Parses an RFC 3339 timestamp into UTC, truncated to microseconds (what both
/// databases keep).
///
/// A leap second (`:60`) is refused: both databases would store it as the
/// next second, possibly in the next day or month, while the instant was
/// judged in this one, and a retry would then no longer match what is stored.
pub fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, String> {
    use chrono::Datelike;
    let t = read_timestamp(text)?;
    if !(1..=9999).contains(&t.year()) {
        return Err(format!("{text:?} is outside the years 1 to 9999"));
    }
    within_writable_periods(text, t)
}

/// Parses the instant a setting starts or ends at (`effective_at` of a plan,
/// `expires_at` of an override) as [`parse_timestamp`] does, but refuses an
/// instant out of range in the words of `field`, with `instead` (what to
/// send), rather than of the month an entry would count in.
pub fn parse_setting_instant(field: &str, text: &str, instead: &str) -> Result<DateTime<Utc>, String> {
    use chrono::Datelike;
    let t = read_timestamp(text).map_err(|m| format!("{field}: {m}"))?;
    let side = if t.year() < 1 {
        "earlier"
    } else if within_writable_periods(text, t).is_err() || t.year() > 9999 {
        "later"
    } else {
        return Ok(t);
    };
    Err(format!(
        "{field} {text:?} is {side} than Tally can record: it takes instants from 0001-01-01T00:00:00Z to before \
         9999-12-01T00:00:00Z (a later month would end in year 10000, which RFC 3339 cannot write); {instead}"
    ))
}

/// An RFC 3339 text as a UTC instant truncated to microseconds, leap
/// seconds refused; no range check.
fn read_timestamp(text: &str) -> Result<DateTime<Utc>, String> {
    Ok(read_timestamp_to_the_nanosecond(text)?.trunc_subsecs(6))
}

/// [`read_timestamp`] before its truncation.
fn read_timestamp_to_the_nanosecond(text: &str) -> Result<DateTime<Utc>, String> {
    use chrono::Timelike;
    let parsed = DateTime::parse_from_rfc3339(text).map_err(|e| not_rfc3339(text, e))?;
    if parsed.nanosecond() >= 1_000_000_000 {
        return Err(format!(
            "{text:?} is a leap second (:60), which Tally does not store; write :59.999999 or the next second"
        ));
    }
    Ok(parsed.with_timezone(&Utc))
}

/// Refuses an instant in December 9999: its month ends in year 10000, a
/// `period_end` RFC 3339 cannot write.
fn within_writable_periods(text: &str, t: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    use chrono::Datelike;
    if t.year() == 9999 && t.month() == 12 {
        return Err(format!(
            "{text:?} is in December 9999, whose month would end in year 10000, which RFC 3339 cannot write; \
             give an instant before 9999-12-01"
        ));
    }
    Ok(t)
}

/// Says what is wrong with `text` as an RFC 3339 timestamp, for the mistakes
/// clients make (chrono alone says "premature end of input" for most).
fn not_rfc3339(text: &str, e: chrono::ParseError) -> String {
    const LIKE: &str = "write it like 2026-11-23T14:05:00Z";
    let date_shaped = super::period::date_shaped(text);
    // 2026-12-3 or 2026-1-05T…: a one-digit month or day, which chrono
    // calls too short.
    let date_part = text.split(['T', 't', ' ']).next().unwrap_or_default();
    let short_month_or_day = {
        let parts: Vec<&str> = date_part.split('-').collect();
        parts.len() == 3
            && parts[0].len() == 4
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            && (parts[1].len() == 1 || parts[2].len() == 1)
    };
    let without_offset = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").is_ok();
    // ISO 8601's basic offset (+0100): RFC 3339 wants the colon.
    let with_colon = |text: &str| {
        text.len()
            .checked_sub(2)
            .filter(|&at| text.is_char_boundary(at))
            .map(|at| format!("{}:{}", &text[..at], &text[at..]))
            .filter(|fixed| DateTime::parse_from_rfc3339(fixed).is_ok())
    };
    let offset_without_colon = with_colon(text);
    // A '+' a URL query string turned into a space, the offset's colon
    // perhaps missing too: what the timestamp would be with both mended.
    let plus_read_as_space = text.rsplit_once(' ').and_then(|(head, tail)| {
        let plus = format!("{head}+{tail}");
        if DateTime::parse_from_rfc3339(&plus).is_ok() {
            Some(plus)
        } else {
            with_colon(&plus)
        }
    });
    // A value echoed in full could be megabytes: show its start.
    let text = &shown(text);
    if short_month_or_day {
        format!("{text:?} has a one-digit month or day; months and days take two digits: {LIKE}")
    } else if date_shaped && chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").is_err() {
        format!("{text:?} is not a calendar date (month 1 to 12, a day that month has); {LIKE}")
    } else if date_shaped {
        format!("{text:?} is a date without a time; {LIKE} ({text}T00:00:00Z for its midnight)")
    } else if without_offset {
        format!("{text:?} has no UTC offset; end it with Z (UTC) or an offset like +01:00: {text}Z")
    } else if let Some(with_colon) = offset_without_colon {
        format!("{text:?} has its UTC offset without a colon; RFC 3339 writes it {with_colon}")
    } else if let Some(mended) = plus_read_as_space {
        format!(
            "{text:?} has a space where its offset's '+' belongs; in a URL query string '+' reads as \
             a space, so write it there as %2B ({}), or give the time in UTC with Z",
            mended.replacen('+', "%2B", 1)
        )
    } else {
        let reason = match e.kind() {
            chrono::format::ParseErrorKind::OutOfRange => {
                "a field is out of range (a month over 12, a day that month does not have, an hour over 23, …)"
            }
            chrono::format::ParseErrorKind::TooShort if starts_like_a_timestamp(text) => {
                "it is cut short: part of YYYY-MM-DDTHH:MM:SS and its offset is missing"
            }
            chrono::format::ParseErrorKind::TooLong => "there is text after the timestamp",
            _ => "it does not have the shape YYYY-MM-DDTHH:MM:SS with an offset",
        };
        format!("{text:?} is not an RFC 3339 timestamp: {reason}; {LIKE}")
    }
}

/// Whether `text` begins the way a timestamp does (digits and separators where
/// YYYY-MM-DDTHH:MM:SS has them), so that chrono's "too short" means a part is
/// missing, not that the text is something else ("bad", "12/01/2026").
fn starts_like_a_timestamp(text: &str) -> bool {
    const SHAPE: &str = "0000-00-00T00:00:00";
    !text.is_empty()
        && text.chars().zip(SHAPE.chars()).all(|(c, want)| match want {
            '0' => c.is_ascii_digit(),
            'T' => matches!(c, 'T' | 't' | ' '),
            separator => c == separator,
        })
}

/// An instant as the reads take it: RFC 3339, or a plain date (`2026-11-01`)
/// meaning its UTC midnight. The HTTP query parameters and the CLI's `--at`
/// alike.
pub fn parse_instant_or_date(raw: &str) -> Result<DateTime<Utc>, String> {
    if super::period::date_shaped(raw) && chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d").is_ok() {
        let day = super::period::parse_date(raw)?;
        return within_writable_periods(raw, day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    parse_timestamp(raw).map_err(|m| format!("{m} (or a date like 2026-11-01)"))
}

/// [`parse_instant_or_date`] for an instant no period is read at: a bound of
/// the entries listing, the instant a feature is asked about. December 9999
/// is fine there (review AP: it was refused for a month that no such read
/// has).
pub fn parse_bound(raw: &str) -> Result<DateTime<Utc>, String> {
    use chrono::Datelike;
    if super::period::date_shaped(raw) && chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d").is_ok() {
        let day = super::period::parse_date(raw)?;
        return Ok(day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    let t = read_timestamp(raw).map_err(|m| format!("{m} (or a date like 2026-11-01)"))?;
    if !(1..=9999).contains(&t.year()) {
        return Err(format!("{raw:?} is outside the years 1 to 9999"));
    }
    Ok(t)
}

/// [`parse_bound`] for a bound of a range of stored instants (`from`
/// inclusive, `to` exclusive), rounded *up* to the microsecond rather than
/// truncated: a stored instant (whole microseconds) is at or past
/// `…59.9999991` exactly when it is at or past `…00.000000`, and before it
/// exactly when it is before that too. Truncated, `from=…59.9999991Z` took
/// in the rows of `…59.999999` (review BL).
pub fn parse_range_bound(raw: &str) -> Result<DateTime<Utc>, String> {
    use chrono::Timelike;
    let bound = parse_bound(raw)?;
    if super::period::date_shaped(raw) && chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d").is_ok() {
        return Ok(bound);
    }
    let exact = read_timestamp_to_the_nanosecond(raw)?;
    if exact.nanosecond() % 1_000 == 0 {
        return Ok(bound);
    }
    let rounded_up = bound + chrono::Duration::microseconds(1);
    // Rounded up into year 10000, which RFC 3339 cannot write: the last
    // microsecond of 9999 selects the same rows, since no entry can be in
    // December 9999 (review BN: such a `to` was refused).
    if chrono::Datelike::year(&rounded_up) > 9999 {
        return Ok(bound);
    }
    Ok(rounded_up)
}

/// Why U+0000 is refused, for error messages.
const NUL_REASON: &str =
    "the ledger cannot store it (PostgreSQL refuses it in text and JSON); remove it or escape it in your own way";

/// Refuses text holding U+0000 on both engines alike: PostgreSQL cannot
/// store it in TEXT (SQLSTATE 22021) or JSONB (22P05), and SQLite would keep
/// what PostgreSQL refuses.
pub fn refuse_nul(field: &str, text: &str) -> Result<(), String> {
    if text.contains('\0') {
        Err(format!(
            "{field} must not contain the NUL character (\\u0000); {NUL_REASON}"
        ))
    } else {
        Ok(())
    }
}

/// Whether a key or string anywhere in `value` holds U+0000.
fn json_holds_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(text) => text.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(json_holds_nul),
        serde_json::Value::Object(fields) => fields
            .iter()
            .any(|(key, value)| key.contains('\0') || json_holds_nul(value)),
        serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => false,
    }
}

/// `value` with its numbers as PostgreSQL's JSON keeps them, so that both
/// engines give back the same metadata:
/// - a negative zero (`-0`, `-0.0`, which serde_json keeps and writes as
///   `-0.0`) is `0.0`: PostgreSQL's JSON numbers have no negative zero
///   (review N);
/// - a float serde_json writes with an exponent that is a whole number
///   within 64 bits (`1e19`, `1.2345678901234567e19`) is that integer:
///   PostgreSQL writes it out in full, which reads back as an integer,
///   while SQLite kept the float (review BL).
///
/// Told by its text, with no float arithmetic: metadata is not an amount,
/// but nothing here needs a float either.
fn as_postgresql_keeps_it(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Number(n) if n.is_f64() => {
            let text = n.to_string();
            if text == "-0.0" {
                return serde_json::Value::Number("0.0".parse().expect("0.0 is a JSON number"));
            }
            whole_number_written_with_an_exponent(&text).map_or(serde_json::Value::Number(n), serde_json::Value::Number)
        }
        serde_json::Value::Array(items) => items.into_iter().map(as_postgresql_keeps_it).collect(),
        serde_json::Value::Object(fields) => fields
            .into_iter()
            .map(|(key, value)| (key, as_postgresql_keeps_it(value)))
            .collect(),
        other => other,
    }
}

/// The integer a number written with an exponent (`1.5e19`) stands for,
/// when it is a whole one within `i64` (negative) or `u64` (positive):
/// the range serde_json reads back as an integer.
fn whole_number_written_with_an_exponent(text: &str) -> Option<serde_json::Number> {
    use rust_decimal::prelude::ToPrimitive as _;
    if !text.contains(['e', 'E']) {
        return None;
    }
    let number = rust_decimal::Decimal::from_scientific(text).ok()?;
    if !number.fract().is_zero() {
        return None;
    }
    if number.is_sign_negative() {
        number.to_i64().map(serde_json::Number::from)
    } else {
        number.to_u64().map(serde_json::Number::from)
    }
}

impl EntryInput {
    /// Validates the entry at `index`, collecting every problem.
    pub fn validate(self, index: usize, rules: EntryRules<'_>) -> Result<NewEntry, Vec<FieldError>> {
        match self.validate_apart_from_horizon(index, rules)? {
            Validated::Valid(entry) => Ok(entry),
            Validated::OnlyTooLate(_, late) => Err(vec![late]),
        }
    }

    /// As [`EntryInput::validate`], but an entry whose only problem is the
    /// late-arrival horizon comes back with that problem apart: a retry of
    /// an entry recorded while it was within the horizon is still a
    /// duplicate (or a conflict), so the caller asks the ledger first.
    pub fn validate_apart_from_horizon(
        self,
        index: usize,
        rules: EntryRules<'_>,
    ) -> Result<Validated, Vec<FieldError>> {
        let mut late = None;
        let mut errors = Vec::new();
        let mut fail = |field: &'static str, code: &'static str, message: String| {
            errors.push(FieldError {
                index,
                field,
                code,
                message,
            });
        };

        let account = match self.account.as_deref() {
            None => {
                fail("account", "missing", "account is required".into());
                None
            }
            Some(raw) => AccountId::parse(raw).map_err(|m| fail("account", "invalid", m)).ok(),
        };
        let resource = match self.resource.as_deref() {
            None => {
                fail("resource", "missing", "resource is required".into());
                None
            }
            Some(raw) => match rules.catalog.resource(raw) {
                Ok((name, spec)) => Some((name.clone(), spec.decimals)),
                Err(e) => {
                    fail("resource", "unknown_resource", e.to_string());
                    None
                }
            },
        };
        let amount = match (&self.amount, &resource) {
            (None, _) => {
                fail("amount", "missing", "amount is required".into());
                None
            }
            (Some(raw), Some((name, decimals))) => match amount_text(raw) {
                Ok(text) => Amount::parse(&text, *decimals)
                    .map_err(|e| fail("amount", "invalid", e.of_resource(name.as_str(), *decimals)))
                    .ok(),
                Err(m) => {
                    fail("amount", "invalid", m);
                    None
                }
            },
            // Without a resource its precision is unknown, but what is wrong
            // with an amount whatever the resource is reported all the same.
            (Some(raw), None) => {
                match amount_text(raw).map(|text| Amount::parse(&text, MAX_DECIMALS)) {
                    Err(m) => fail("amount", "invalid", m),
                    Ok(Err(
                        e @ (AmountError::NotANumber(_)
                        | AmountError::Zero
                        | AmountError::OutOfRange(_)
                        | AmountError::TooManyDigits(_)),
                    )) => fail("amount", "invalid", e.to_string()),
                    Ok(_) => {}
                }
                None
            }
        };
        let idempotency_key = match self.idempotency_key.as_deref() {
            None => {
                fail("idempotency_key", "missing", "idempotency_key is required".into());
                None
            }
            Some(raw) => IdempotencyKey::parse(raw)
                .map_err(|m| fail("idempotency_key", "invalid", m))
                .ok(),
        };
        let occurred_at = match self.occurred_at.as_deref() {
            None => Some(rules.now.trunc_subsecs(6)),
            Some(raw) => match parse_timestamp(raw) {
                Err(m) => {
                    fail("occurred_at", "invalid", m);
                    None
                }
                Ok(t) if t > rules.now + MAX_CLOCK_SKEW => {
                    fail(
                        "occurred_at",
                        "in_future",
                        format!(
                            "occurred_at {raw} is more than 5 minutes ahead of the server's clock ({}); send the \
                             instant the usage happened, from a synchronised clock (NTP), or leave occurred_at out to \
                             record it at the server's time",
                            rules.now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        ),
                    );
                    None
                }
                Ok(t) if !rules.allow_late && t < rules.now - rules.late_horizon => {
                    late = Some(FieldError {
                        index,
                        field: "occurred_at",
                        code: "too_late",
                        message: format!(
                            "occurred_at {raw} is older than the late-arrival horizon of {} days{}",
                            rules.late_horizon.num_days(),
                            rules.too_late
                        ),
                    });
                    Some(t)
                }
                Ok(t) => Some(t),
            },
        };
        if let Some(source) = &self.source {
            if source.chars().count() > 255 {
                fail("source", "invalid", "source must be at most 255 characters".into());
            }
            if let Err(message) = refuse_nul("source", source) {
                fail("source", "invalid", message);
            }
        }
        let metadata = match self.metadata {
            None | Some(serde_json::Value::Null) => None,
            Some(value @ serde_json::Value::Object(_)) => {
                // Measured as sent: a number such as `1e19` is kept written
                // out in full, longer than the client wrote it (review BN).
                let sent_bytes = value.to_string().len();
                let value = as_postgresql_keeps_it(value);
                let text = value.to_string();
                if json_holds_nul(&value) {
                    fail(
                        "metadata",
                        "invalid",
                        format!(
                            "metadata must not contain the NUL character (\\u0000) in a key or string; {NUL_REASON}"
                        ),
                    );
                    None
                } else if sent_bytes > MAX_METADATA_BYTES {
                    fail(
                        "metadata",
                        "invalid",
                        format!("metadata is {sent_bytes} bytes as JSON; the limit is {MAX_METADATA_BYTES}"),
                    );
                    None
                } else {
                    Some(text)
                }
            }
            Some(other) => {
                let got = match other {
                    serde_json::Value::Bool(on) => format!("a boolean ({on})"),
                    serde_json::Value::Number(_) => "a number".to_owned(),
                    serde_json::Value::String(_) => "a string".to_owned(),
                    _ => "an array".to_owned(),
                };
                fail(
                    "metadata",
                    "invalid",
                    format!("metadata must be a JSON object, such as {{\"region\": \"eu\"}}, or left out; got {got}"),
                );
                None
            }
        };

        if let Some(late) = late.take_if(|_| !errors.is_empty()) {
            // Told with the others, in field order: before source and metadata.
            let at = errors
                .iter()
                .position(|e| matches!(e.field, "source" | "metadata"))
                .unwrap_or(errors.len());
            errors.insert(at, late);
        }
        match (account, resource, amount, idempotency_key, occurred_at) {
            (Some(account), Some((resource, _)), Some(amount), Some(idempotency_key), Some(occurred_at))
                if errors.is_empty() =>
            {
                let entry = NewEntry {
                    account,
                    resource,
                    amount,
                    idempotency_key,
                    occurred_at,
                    occurred_at_given: self.occurred_at.is_some(),
                    source: self.source,
                    metadata,
                    reverses: None,
                };
                Ok(match late {
                    None => Validated::Valid(entry),
                    Some(late) => Validated::OnlyTooLate(entry, late),
                })
            }
            _ => Err(errors),
        }
    }
}

/// An entry that passed validation, or would have but for its age.
#[derive(Debug)]
pub enum Validated {
    /// Valid.
    Valid(NewEntry),
    /// Valid but older than the late-arrival horizon: new, it is refused
    /// with this error; a retry of one already recorded is not.
    OnlyTooLate(NewEntry, FieldError),
}

/// The text of a JSON amount ([`json_decimal_text`]), or what is wrong with it.
fn amount_text(raw: &RawValue) -> Result<Cow<'_, str>, String> {
    json_decimal_text(raw).map_err(|e| match e {
        JsonDecimalError::BadString(e) => format!("amount is not a valid JSON string: {e}"),
        JsonDecimalError::NotStringOrNumber => not_a_decimal("amount", raw),
    })
}

/// An entry as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// Ledger id (ascending in insertion order).
    pub id: i64,
    /// Account id.
    pub account: AccountId,
    /// Resource name.
    pub resource: ResourceName,
    /// Signed exact amount.
    pub amount: Amount,
    /// When the usage happened.
    pub occurred_at: DateTime<Utc>,
    /// When the ledger recorded it.
    pub recorded_at: DateTime<Utc>,
    /// The idempotency key it was posted with.
    pub idempotency_key: IdempotencyKey,
    /// Free text naming the sender.
    pub source: Option<String>,
    /// The JSON object posted with it.
    pub metadata: Option<serde_json::Value>,
    /// The entry this one reverses.
    pub reverses: Option<i64>,
}

/// Whether a post created a row or matched an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InsertStatus {
    /// A new ledger row.
    Created,
    /// The same key with the same content was already there; nothing changed.
    Duplicate,
}

/// The outcome of one posted entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InsertOutcome {
    /// The ledger id (the earlier one for a duplicate).
    pub id: i64,
    /// The key as posted.
    pub idempotency_key: IdempotencyKey,
    /// Created or duplicate.
    pub status: InsertStatus,
}

/// Which ledger rows to list.
#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    /// Only this account.
    pub account: Option<AccountId>,
    /// Only this resource.
    pub resource: Option<ResourceName>,
    /// occurred_at ≥ from.
    pub from: Option<DateTime<Utc>>,
    /// occurred_at < to.
    pub to: Option<DateTime<Utc>>,
    /// id > after_id (keyset pagination).
    pub after_id: Option<i64>,
    /// At most this many rows.
    pub limit: u32,
}

/// What an entry older than the late-arrival horizon is told to do
/// ([`EntryRules::too_late`]; a consume, which the import's backfill would
/// not check, says otherwise).
pub const BACKFILL: &str = "; backfill it with `tally import --allow-late`";

/// Validates every entry of a batch; all problems are reported together.
/// When the only problems are entries past the late-arrival horizon, every
/// entry comes back with those problems apart (see
/// [`EntryInput::validate_apart_from_horizon`]): refuse them unless the
/// ledger already holds their keys.
pub fn validate_batch(inputs: Vec<EntryInput>, rules: EntryRules<'_>) -> Result<ValidBatch, Vec<FieldError>> {
    let mut entries = Vec::with_capacity(inputs.len());
    let mut too_late = Vec::new();
    let mut errors = Vec::new();
    for (index, input) in inputs.into_iter().enumerate() {
        match input.validate_apart_from_horizon(index, rules) {
            Ok(Validated::Valid(entry)) => entries.push(entry),
            Ok(Validated::OnlyTooLate(entry, late)) => {
                entries.push(entry);
                too_late.push(late);
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(ValidBatch { entries, too_late })
    } else {
        // In entry order, as each entry's own problems are.
        errors.extend(too_late);
        errors.sort_by_key(|e| e.index);
        Err(errors)
    }
}

/// A batch that passed validation but, perhaps, for the age of some entries.
#[derive(Debug)]
pub struct ValidBatch {
    /// Every entry, in request order.
    pub entries: Vec<NewEntry>,
    /// The entries past the late-arrival horizon (by `index`), each a
    /// `too_late` error unless the ledger already holds its key.
    pub too_late: Vec<FieldError>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_range_bound_between_microseconds_is_rounded_up_but_not_past_9999() {
        let bound = |text: &str| {
            super::parse_range_bound(text)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        };
        assert_eq!(bound("2026-11-30T23:59:59.9999991Z"), "2026-12-01T00:00:00.000000Z");
        assert_eq!(bound("1969-12-31T23:59:59.9999991Z"), "1970-01-01T00:00:00.000000Z");
        assert_eq!(bound("2026-11-30T23:59:59.999999000Z"), "2026-11-30T23:59:59.999999Z");
        assert_eq!(bound("2026-11-30"), "2026-11-30T00:00:00.000000Z");
        assert_eq!(bound("9999-12-31T23:59:59.9999991Z"), "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn only_whole_numbers_within_64_bits_written_with_an_exponent_become_integers() {
        let integer = |text: &str| super::whole_number_written_with_an_exponent(text).map(|n| n.to_string());
        assert_eq!(integer("1e19").as_deref(), Some("10000000000000000000"));
        assert_eq!(
            integer("1.2345678901234567e19").as_deref(),
            Some("12345678901234567000"),
            "the digits written, not the float's own"
        );
        assert_eq!(integer("-1e18").as_deref(), Some("-1000000000000000000"));
        assert_eq!(integer("1.8446744073709552e19"), None, "past u64");
        assert_eq!(integer("-1e19"), None, "past i64");
        assert_eq!(integer("1.5e-7"), None, "not whole");
        assert_eq!(integer("1e300"), None, "past what a decimal holds");
        assert_eq!(integer("1000000000000000.0"), None, "no exponent: kept as written");
    }

    #[test]
    fn a_bad_timestamp_is_told_what_is_wrong_with_it() {
        let message = |text: &str| super::parse_timestamp(text).unwrap_err();
        for (text, says) in [
            ("2026-12-01", "a date without a time"),
            ("2026-13-01", "not a calendar date"),
            ("2026-12-01T00:00:00", "no UTC offset"),
            ("2026-11-15T12:00:00 01:00", "%2B"),
            ("2026-12-01T25:00:00Z", "out of range"),
            ("2026-12-01T14:0", "cut short"),
            ("2026-12-3", "one-digit month or day"),
            ("2026-1-05T10:00:00Z", "one-digit month or day"),
            ("2026-12-01T14:05:00", "no UTC offset"),
            ("bad", "does not have the shape"),
            ("", "does not have the shape"),
            ("12/01/2026", "does not have the shape"),
            ("2026-12-01T14:05:00+0100", "2026-12-01T14:05:00+01:00"),
            ("2026-12-01T14:05€", "does not have the shape"),
            ("2026-12-01T14:05:00 0100", "2026-12-01T14:05:00%2B01:00"),
            ("2026-11-15T12:00:00 01:00", "2026-11-15T12:00:00%2B01:00"),
            ("yesterday", "2026-11-23T14:05:00Z"),
            ("9999-12-31T00:00:00Z", "before 9999-12-01"),
        ] {
            let got = message(text);
            assert!(got.contains(says), "{text}: {got}");
            assert!(!got.contains("premature"), "{text}: {got}");
        }
        // A huge value is not echoed whole (twice, into a 10 MB answer).
        let huge = message(&"9".repeat(5_000_000));
        assert!(huge.len() < 400 && huge.contains("(5000000 bytes)"), "{}", huge.len());
    }
}
