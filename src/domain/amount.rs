//! Exact amounts. An amount is kept as an integer count of the resource's minor
//! unit (`decimals` fractional digits), so sums are integer sums: no floating
//! point anywhere, SQL included (DESIGN.md, invariant 6).

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;

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
    #[error("amount must not be zero")]
    Zero,
    /// |amount| ≥ 10^15.
    #[error("amount {0} is out of range; |amount| must be below 10^15")]
    OutOfRange(String),
    /// More fractional digits than the resource declares.
    #[error("amount {amount} has {found} fractional digits; this resource allows {allowed}")]
    TooPrecise {
        /// The amount as given.
        amount: String,
        /// Fractional digits found.
        found: u32,
        /// Fractional digits the resource declares.
        allowed: u32,
    },
    /// The minor-unit value does not fit a 64-bit integer (only for resources with many decimals).
    #[error("amount {0} is too large for a resource with this many fractional digits")]
    TooLargeForPrecision(String),
    /// A sum left the 64-bit range.
    #[error("sum overflows the 64-bit range of minor units")]
    Overflow,
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
        let value = parse_decimal(text)?;
        if value.is_zero() {
            return Err(AmountError::Zero);
        }
        if value.abs() >= Decimal::from(MAX_ABS_AMOUNT) {
            return Err(AmountError::OutOfRange(text.to_owned()));
        }
        Self::from_decimal(value, decimals, text)
    }

    /// Converts an exact decimal into minor units without the per-entry range
    /// checks (used for limits and totals, which may be zero or large).
    pub fn from_decimal(value: Decimal, decimals: u32, original: &str) -> Result<Self, AmountError> {
        let normalized = value.normalize();
        if normalized.scale() > decimals {
            return Err(AmountError::TooPrecise {
                amount: original.to_owned(),
                found: normalized.scale(),
                allowed: decimals,
            });
        }
        let mut scaled = normalized;
        scaled.rescale(decimals);
        let mantissa = scaled.mantissa();
        let minor = i64::try_from(mantissa).map_err(|_| AmountError::TooLargeForPrecision(original.to_owned()))?;
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

    /// The amount with the opposite sign (for reversals).
    pub fn negated(self) -> Self {
        Self {
            minor: -self.minor,
            decimals: self.decimals,
        }
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

/// Parses decimal text exactly: `Decimal::from_str_exact` refuses to round, and
/// scientific notation goes through `from_scientific`, which is exact too.
pub fn parse_decimal(text: &str) -> Result<Decimal, AmountError> {
    let trimmed = text.trim();
    let not_a_number = || AmountError::NotANumber(text.to_owned());
    if trimmed.is_empty() || trimmed != text {
        return Err(not_a_number());
    }
    if trimmed.contains(['e', 'E']) {
        return Decimal::from_scientific(trimmed).map_err(|_| not_a_number());
    }
    if !trimmed
        .trim_start_matches(['-', '+'])
        .chars()
        .all(|c| c.is_ascii_digit() || c == '.')
    {
        return Err(not_a_number());
    }
    Decimal::from_str_exact(trimmed).or_else(|_| {
        // from_str_exact refuses digits beyond 28 significant ones; anything
        // that long is out of range for us anyway, so say so precisely.
        Decimal::from_str(trimmed)
            .map_err(|_| not_a_number())
            .and_then(|_| Err(AmountError::OutOfRange(text.to_owned())))
    })
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
    fn large_amounts_with_many_decimals_are_refused_not_wrapped() {
        assert!(matches!(
            Amount::parse("999999999999999", 9),
            Err(AmountError::TooLargeForPrecision(_))
        ));
        assert!(Amount::parse("999999999.123456789", 9).is_ok());
    }

    #[test]
    fn sums_overflow_as_errors() {
        let big = Amount::from_minor(i64::MAX, 0);
        assert_eq!(big.checked_add(Amount::from_minor(1, 0)), Err(AmountError::Overflow));
    }
}
