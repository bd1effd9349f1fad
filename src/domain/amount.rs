//! Exact amounts. An amount is kept as an integer count of the resource's minor
//! unit (`decimals` fractional digits), so sums are integer sums: no floating
//! point anywhere, SQL included (DESIGN.md, invariant 6).

use std::borrow::Cow;
use std::fmt;

use rust_decimal::Decimal;
use serde_json::value::RawValue;

use super::shown;

/// The bound on an entry's magnitude: |amount| < 10^15.
pub const MAX_ABS_AMOUNT: i64 = 1_000_000_000_000_000;

/// The most fractional digits a resource may declare.
pub const MAX_DECIMALS: u32 = 9;

/// Why a text is not a valid amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// Not a decimal number at all.
    #[error("{0:?} is not a decimal number (write it like \"1500\" or \"0.25\")")]
    NotANumber(String),
    /// Zero carries no usage.
    #[error(
        "amount must not be zero: an entry records a change (positive for use, negative for a correction or a \
         deletion); leave out an entry that changes nothing"
    )]
    Zero,
    /// |amount| ≥ 10^15.
    #[error("amount {0} is out of range; |amount| must be below 10^15")]
    OutOfRange(String),
    /// More fractional digits than the resource declares.
    #[error(
        "amount {amount} has {found} significant fractional digit{} (trailing zeros aside); this resource allows {allowed}",
        if *found == 1 { "" } else { "s" }
    )]
    TooPrecise {
        /// The amount as given.
        amount: String,
        /// Fractional digits found.
        found: u32,
        /// Fractional digits the resource declares.
        allowed: u32,
    },
    /// More significant or fractional digits than an exact decimal holds.
    #[error("amount {0} has more than 28 significant or fractional digits; no amount, limit or price is that precise")]
    TooManyDigits(String),
    /// More than 28 digits before the point: past any amount, limit or price
    /// (an entry amount reports [`AmountError::OutOfRange`] instead).
    #[error("{0} is too large for any amount, limit or price (more than 28 digits before the point)")]
    BeyondAnyBound(String),
    /// The minor-unit value does not fit a 64-bit integer (only for resources with many decimals).
    #[error(
        "amount {amount} is too large for a resource with {decimals} fractional digits: its minor units must fit 64 bits, so |amount| must be at most {max}"
    )]
    TooLargeForPrecision {
        /// The amount as given.
        amount: String,
        /// Fractional digits the resource declares.
        decimals: u32,
        /// The largest magnitude that fits.
        max: Decimal,
    },
    /// A sum left the 64-bit range.
    #[error("sum overflows the 64-bit range of minor units")]
    Overflow,
}

impl AmountError {
    /// This error said of an amount of `resource`, which takes `decimals`
    /// fractional digits: a precision error names them, since "this
    /// resource" alone leaves the caller to look them up.
    pub fn of_resource(&self, resource: &str, decimals: u32) -> String {
        match self {
            Self::TooPrecise { amount, found, allowed } => format!(
                "amount {amount} has {found} significant fractional digit{} (trailing zeros aside); '{resource}' \
                 takes {allowed}",
                if *found == 1 { "" } else { "s" }
            ),
            Self::TooLargeForPrecision { amount, max, .. } => format!(
                "amount {amount} is too large for '{resource}', which takes {decimals} fractional digits: its minor \
                 units must fit 64 bits, so |amount| must be at most {max}"
            ),
            _ => self.to_string(),
        }
    }
}

/// An exact, signed amount of a resource: `minor` units of 10^-`decimals`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Amount {
    minor: i64,
    decimals: u32,
}

impl Amount {
    /// Parses an entry amount: non-zero, |amount| < 10^15, at most `decimals`
    /// fractional digits. Accepts plain decimals and scientific notation, exactly.
    pub fn parse(text: &str, decimals: u32) -> Result<Self, AmountError> {
        let value = parse_decimal(text).map_err(|e| match e {
            AmountError::BeyondAnyBound(text) => AmountError::OutOfRange(text),
            other => other,
        })?;
        if value.is_zero() {
            return Err(AmountError::Zero);
        }
        if value.abs() >= Decimal::from(MAX_ABS_AMOUNT) {
            return Err(AmountError::OutOfRange(shown(text)));
        }
        Self::from_decimal(value, decimals, text)
    }

    /// Converts an exact decimal into minor units without the per-entry range
    /// checks (used for limits and totals, which may be zero or large).
    pub fn from_decimal(value: Decimal, decimals: u32, original: &str) -> Result<Self, AmountError> {
        let normalized = value.normalize();
        if normalized.scale() > decimals {
            return Err(AmountError::TooPrecise {
                amount: shown(original),
                found: normalized.scale(),
                allowed: decimals,
            });
        }
        let mut scaled = normalized;
        scaled.rescale(decimals);
        let mantissa = scaled.mantissa();
        // Symmetric: i64::MIN has no negation, and every amount must have
        // one (a reversal is the opposite amount).
        let minor = i64::try_from(mantissa)
            .ok()
            .filter(|minor| *minor != i64::MIN)
            .ok_or_else(|| AmountError::TooLargeForPrecision {
                amount: shown(original),
                decimals,
                max: Decimal::new(i64::MAX, decimals),
            })?;
        Ok(Self { minor, decimals })
    }

    /// Rebuilds an amount from its stored minor units.
    pub fn from_minor(minor: i64, decimals: u32) -> Self {
        Self { minor, decimals }
    }

    /// Zero of a resource with `decimals` fractional digits.
    pub fn zero(decimals: u32) -> Self {
        Self::from_minor(0, decimals)
    }

    /// One whole unit of a resource with `decimals` fractional digits (at
    /// most [`MAX_DECIMALS`], so 10^decimals fits): what a check counts when
    /// no amount is given.
    pub fn one(decimals: u32) -> Self {
        Self::from_minor(10i64.pow(decimals), decimals)
    }

    /// The integer count of minor units, as stored.
    pub fn minor(self) -> i64 {
        self.minor
    }

    /// The resource's fractional digits.
    pub fn decimals(self) -> u32 {
        self.decimals
    }

    /// The exact decimal value.
    pub fn to_decimal(self) -> Decimal {
        Decimal::new(self.minor, self.decimals)
    }

    /// The amount with the opposite sign (for reversals). Every parsed amount
    /// has one; only a row of `i64::MIN` minor units written by hand has not.
    pub fn checked_neg(self) -> Option<Self> {
        Some(Self {
            minor: self.minor.checked_neg()?,
            decimals: self.decimals,
        })
    }

    /// Exact addition; overflow is an error, never a wrap.
    pub fn checked_add(self, other: Self) -> Result<Self, AmountError> {
        debug_assert_eq!(self.decimals, other.decimals);
        self.minor
            .checked_add(other.minor)
            .map(|minor| Self::from_minor(minor, self.decimals))
            .ok_or(AmountError::Overflow)
    }
}

/// The canonical text: no exponent, no trailing fractional zeros ("1500", "0.25", "-3").
impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_decimal().normalize())
    }
}

impl serde::Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Why a JSON value gives no decimal text (see [`json_decimal_text`]).
#[derive(Debug)]
pub enum JsonDecimalError {
    /// A JSON string that does not decode: `RawValue` accepts a lone
    /// surrogate escape (`"\ud800"`), a Rust `String` cannot hold one.
    BadString(serde_json::Error),
    /// Neither a string nor a number (`true`, an object, …).
    NotStringOrNumber,
}

/// What a JSON value is, for a message about a field that wanted a decimal
/// ("got a boolean (true)"); an object or array is named, not quoted.
pub fn json_kind(raw: &RawValue) -> String {
    match raw.get().trim_start().as_bytes().first() {
        Some(b't' | b'f') => format!("a boolean ({})", raw.get().trim()),
        Some(b'n') => "null".to_owned(),
        Some(b'{') => "an object".to_owned(),
        Some(b'[') => "an array".to_owned(),
        Some(b'"') => "a string".to_owned(),
        _ => "a number".to_owned(),
    }
}

/// The message for `field` holding a JSON value that is neither a string
/// nor a number ([`JsonDecimalError::NotStringOrNumber`]).
pub fn not_a_decimal(field: &str, raw: &RawValue) -> String {
    format!(
        "{field} must be a decimal string or a JSON number, such as \"1500\" or 0.25; got {}",
        json_kind(raw)
    )
}

/// The decimal text of a JSON amount or limit: a string's contents, or a
/// number's literal digits, kept as written so the value is parsed exactly
/// and never as a binary float.
pub fn json_decimal_text(raw: &RawValue) -> Result<Cow<'_, str>, JsonDecimalError> {
    let text = raw.get();
    if text.starts_with('"') {
        serde_json::from_str::<String>(text)
            .map(Cow::Owned)
            .map_err(JsonDecimalError::BadString)
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Ok(Cow::Borrowed(text))
    } else {
        Err(JsonDecimalError::NotStringOrNumber)
    }
}

/// The most significant digits a [`Decimal`] holds (a 96-bit mantissa).
const MAX_DIGITS: usize = 28;

/// Parses decimal text exactly, never rounding: `[+-]digits[.digits]`, with an
/// optional exponent (`e`/`E`, then `[+-]digits`). The digits are shifted by
/// the exponent as text, so "2.9999999999999999999999999999999e0" is refused
/// (more than `MAX_DIGITS` significant digits) where `Decimal::from_scientific`
/// would round it to 3; trailing fractional zeros are dropped first, so
/// "1.000…0" of any length is 1.
pub fn parse_decimal(text: &str) -> Result<Decimal, AmountError> {
    let not_a_number = || AmountError::NotANumber(shown(text));
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, parse_exponent(exponent).ok_or_else(not_a_number)?),
        None => (text, 0),
    };
    let (negative, unsigned) = match mantissa.as_bytes().first() {
        Some(b'-') => (true, &mantissa[1..]),
        Some(b'+') => (false, &mantissa[1..]),
        _ => (false, mantissa),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
        return Err(not_a_number());
    }
    // value = digits × 10^-scale, with no leading zeros and no trailing
    // fractional zeros.
    let mut digits: String = format!("{whole}{fraction}").trim_start_matches('0').to_owned();
    if digits.is_empty() {
        return Ok(Decimal::ZERO);
    }
    let mut scale = i64::try_from(fraction.len()).unwrap_or(i64::MAX) - exponent;
    while scale > 0 && digits.ends_with('0') {
        digits.pop();
        scale -= 1;
    }
    let whole_digits = i64::try_from(digits.len()).unwrap_or(i64::MAX) - scale;
    if whole_digits > MAX_DIGITS as i64 {
        return Err(AmountError::BeyondAnyBound(shown(text)));
    }
    if scale < 0 {
        digits.extend(std::iter::repeat_n('0', usize::try_from(-scale).unwrap_or(0)));
        scale = 0;
    }
    if digits.len() > MAX_DIGITS || scale > MAX_DIGITS as i64 {
        return Err(AmountError::TooManyDigits(shown(text)));
    }
    let magnitude: i128 = digits.parse().map_err(|_| not_a_number())?;
    let scale = u32::try_from(scale).map_err(|_| not_a_number())?;
    Decimal::try_from_i128_with_scale(if negative { -magnitude } else { magnitude }, scale)
        .map_err(|_| AmountError::TooManyDigits(shown(text)))
}

/// An exponent: `[+-]digits`, at most 6 digits (anything larger is out of
/// range or too precise for any amount; see [`parse_decimal`]).
fn parse_exponent(text: &str) -> Option<i64> {
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    if digits.is_empty() || digits.len() > 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: i64 = digits.parse().ok()?;
    Some(if text.starts_with('-') { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_whole_and_fractional_amounts_exactly() {
        assert_eq!(Amount::parse("1500", 0).unwrap().minor(), 1500);
        assert_eq!(Amount::parse("1.25", 2).unwrap().minor(), 125);
        assert_eq!(Amount::parse("-0.1", 2).unwrap().minor(), -10);
        assert_eq!(Amount::parse("1e3", 0).unwrap().minor(), 1000);
        assert_eq!(Amount::parse("1.50", 2).unwrap().to_string(), "1.5");
    }

    #[test]
    fn an_error_shows_a_long_amount_cut_short() {
        for text in [
            "1".repeat(1_000_000),
            "x".repeat(1_000_000),
            format!("0.{}", "1".repeat(1_000_000)),
        ] {
            let message = Amount::parse(&text, 2).unwrap_err().to_string();
            assert!(message.len() < 300, "{} bytes: {}", message.len(), &message[..300]);
            assert!(
                message.contains("(1000000 bytes)") || message.contains("(1000002 bytes)"),
                "{message}"
            );
        }
    }

    #[test]
    fn rejects_zero_range_precision_and_garbage() {
        assert_eq!(Amount::parse("0", 0), Err(AmountError::Zero));
        assert_eq!(Amount::parse("0.00", 2), Err(AmountError::Zero));
        assert!(matches!(
            Amount::parse("1000000000000000", 0),
            Err(AmountError::OutOfRange(_))
        ));
        assert!(Amount::parse("999999999999999", 0).is_ok());
        assert!(matches!(
            Amount::parse("1.5", 0),
            Err(AmountError::TooPrecise {
                found: 1,
                allowed: 0,
                ..
            })
        ));
        assert!(matches!(Amount::parse("1.251", 2), Err(AmountError::TooPrecise { .. })));
        for bad in ["", " 1", "abc", "1,5", "NaN", "0x10", "1.2.3"] {
            assert!(
                matches!(Amount::parse(bad, 2), Err(AmountError::NotANumber(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn scientific_notation_is_exact_or_refused_never_rounded() {
        let parsed = |text: &str| parse_decimal(text).map(|d| d.normalize().to_string());
        for (text, value) in [
            ("1.5e1", "15"),
            ("-2.5E-1", "-0.25"),
            ("1e+2", "100"),
            ("0e500", "0"),
            ("12.50e-1", "1.25"),
            ("1.0000000000000000000000000000000", "1"),
            ("1.0000000000000000000000000000000e0", "1"),
            ("9999999999999999999999999999", "9999999999999999999999999999"),
            (".5", "0.5"),
            ("5.", "5"),
        ] {
            assert_eq!(parsed(text).as_deref(), Ok(value), "{text}");
        }
        for text in [
            "2.9999999999999999999999999999999e0",
            "1.00000000000000000000000000001e0",
            "1e-30",
            "0.0000000000000000000000000000001",
        ] {
            assert!(
                matches!(parse_decimal(text), Err(AmountError::TooManyDigits(_))),
                "{text}"
            );
        }
        for text in ["1e29", "1e999999", "99999999999999999999999999999"] {
            assert!(
                matches!(parse_decimal(text), Err(AmountError::BeyondAnyBound(_))),
                "{text}"
            );
            assert!(
                matches!(Amount::parse(text, 0), Err(AmountError::OutOfRange(_))),
                "{text}"
            );
        }
        for text in [
            "1_0e2",
            "1e",
            "e5",
            "1e2.5",
            "1e1234567",
            "--1",
            "1e+-2",
            ".",
            "-",
            "1 e2",
        ] {
            assert!(matches!(parse_decimal(text), Err(AmountError::NotANumber(_))), "{text}");
        }
    }

    #[test]
    fn large_amounts_with_many_decimals_are_refused_not_wrapped() {
        assert!(matches!(
            Amount::parse("999999999999999", 9),
            Err(AmountError::TooLargeForPrecision { decimals: 9, .. })
        ));
        assert!(Amount::parse("999999999.123456789", 9).is_ok());
    }

    #[test]
    fn the_range_is_symmetric_so_every_amount_has_a_reversal() {
        // −9223372036854.775808 is i64::MIN micro-units: a reversal of it once
        // wrapped back to the same negative amount.
        assert!(matches!(
            Amount::parse("-9223372036854.775808", 6),
            Err(AmountError::TooLargeForPrecision { decimals: 6, .. })
        ));
        let largest = Amount::parse("-9223372036854.775807", 6).unwrap();
        assert_eq!(largest.checked_neg().unwrap().to_string(), "9223372036854.775807");
        assert_eq!(Amount::from_minor(i64::MIN, 0).checked_neg(), None);
    }

    #[test]
    fn sums_overflow_as_errors() {
        let big = Amount::from_minor(i64::MAX, 0);
        assert_eq!(big.checked_add(Amount::from_minor(1, 0)), Err(AmountError::Overflow));
    }

    #[test]
    fn json_amounts_give_their_text_as_written() {
        let text =
            |json: &str| json_decimal_text(&RawValue::from_string(json.to_owned()).unwrap()).map(Cow::into_owned);
        assert_eq!(text(r#""0.10""#).unwrap(), "0.10");
        assert_eq!(text("0.10").unwrap(), "0.10");
        assert_eq!(text("-1e3").unwrap(), "-1e3");
        assert!(matches!(text("true"), Err(JsonDecimalError::NotStringOrNumber)));
        assert!(matches!(text(r#""\ud800""#), Err(JsonDecimalError::BadString(_))));
    }

    #[test]
    fn a_value_that_is_not_a_decimal_is_named_by_its_json_type() {
        let message = |json: &str| not_a_decimal("amount", &RawValue::from_string(json.to_owned()).unwrap());
        assert_eq!(
            message("true"),
            "amount must be a decimal string or a JSON number, such as \"1500\" or 0.25; got a boolean (true)"
        );
        assert!(message("false").ends_with("got a boolean (false)"));
        assert!(message("null").ends_with("got null"));
        assert!(message(r#"{"a": 1}"#).ends_with("got an object"));
        assert!(message("[1]").ends_with("got an array"));
    }
}
