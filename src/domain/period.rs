//! UTC days and months: the buckets totals are kept in (DESIGN.md, invariant 7).

use chrono::{DateTime, Datelike, Months, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::shown;

/// The size of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// A UTC day.
    Day,
    /// A UTC calendar month.
    Month,
}

impl Granularity {
    /// Parses `day` or `month`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        match raw {
            "day" => Ok(Self::Day),
            "month" => Ok(Self::Month),
            other => Err(format!("granularity {other:?} is not day or month")),
        }
    }

    /// The bucket containing `date`.
    pub fn bucket_of(self, date: NaiveDate) -> NaiveDate {
        match self {
            Self::Day => date,
            Self::Month => month_start(date),
        }
    }

    /// The bucket after `bucket`.
    pub fn next(self, bucket: NaiveDate) -> NaiveDate {
        match self {
            Self::Day => bucket.succ_opt().expect("dates far from the end of time"),
            Self::Month => bucket
                .checked_add_months(Months::new(1))
                .expect("dates far from the end of time"),
        }
    }

    /// Every bucket start in [from, to), at most `max` of them (None if more).
    pub fn buckets(self, from: NaiveDate, to: NaiveDate, max: usize) -> Option<Vec<NaiveDate>> {
        let mut buckets = Vec::new();
        let mut bucket = self.bucket_of(from);
        while bucket < to {
            if buckets.len() == max {
                return None;
            }
            buckets.push(bucket);
            bucket = self.next(bucket);
        }
        Some(buckets)
    }
}

/// The first day of `date`'s month.
pub fn month_start(date: NaiveDate) -> NaiveDate {
    date.with_day(1).expect("every month has a first day")
}

/// Midnight UTC at the start of `date`.
pub fn start_of(date: NaiveDate) -> DateTime<Utc> {
    date.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc()
}

/// Years Tally accepts in dates: four digits, so that period arithmetic never
/// reaches the end of chrono's calendar.
fn plausible(date: NaiveDate) -> Option<NaiveDate> {
    (1..=9999).contains(&date.year()).then_some(date)
}

/// Whether `raw` has exactly the shape of `pattern`, where `0` stands for an
/// ASCII digit: chrono alone takes `26-11` for the year 26 and `2026-1` for
/// January, which turn a typo into a silently wrong report.
fn shaped(raw: &str, pattern: &str) -> bool {
    raw.len() == pattern.len()
        && raw.bytes().zip(pattern.bytes()).all(|(c, want)| match want {
            b'0' => c.is_ascii_digit(),
            separator => c == separator,
        })
}

/// Whether `raw` is shaped like a date, `YYYY-MM-DD` (valid or not).
pub fn date_shaped(raw: &str) -> bool {
    shaped(raw, "0000-00-00")
}

/// Parses a month, `YYYY-MM`, into its first day.
pub fn parse_month(raw: &str) -> Result<NaiveDate, String> {
    Some(raw)
        .filter(|raw| shaped(raw, "0000-00"))
        .and_then(|raw| NaiveDate::parse_from_str(&format!("{raw}-01"), "%Y-%m-%d").ok())
        .and_then(plausible)
        .ok_or_else(|| format!("{:?} is not a month like 2026-11", shown(raw)))
}

/// Parses a date, `YYYY-MM-DD`, or a month, `YYYY-MM`, meaning its first day.
pub fn parse_date(raw: &str) -> Result<NaiveDate, String> {
    Some(raw)
        .filter(|raw| date_shaped(raw))
        .and_then(|raw| NaiveDate::parse_from_str(raw, "%Y-%m-%d").ok())
        .and_then(plausible)
        .or_else(|| parse_month(raw).ok())
        .ok_or_else(|| {
            format!(
                "{:?} is not a date like 2026-11-01 (or a month like 2026-11)",
                shown(raw)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn months_run_from_first_to_first() {
        assert_eq!(Granularity::Month.bucket_of(d("2026-02-28")), d("2026-02-01"));
        assert_eq!(Granularity::Month.next(d("2026-12-01")), d("2027-01-01"));
        assert_eq!(
            Granularity::Month
                .buckets(d("2026-01-01"), d("2026-04-01"), 10)
                .unwrap(),
            [d("2026-01-01"), d("2026-02-01"), d("2026-03-01")]
        );
    }

    #[test]
    fn dates_and_months_need_four_digit_years_and_two_digit_months_and_days() {
        assert_eq!(parse_date("2026-11-05"), Ok(d("2026-11-05")));
        assert_eq!(parse_date("2026-11"), Ok(d("2026-11-01")));
        assert_eq!(parse_month("2026-11"), Ok(d("2026-11-01")));
        for typo in [
            "26-11",
            "26-11-05",
            "2026-1",
            "2026-1-5",
            "+2026-11",
            "02026-11",
            "2026-11-5",
            " 2026-11",
        ] {
            assert!(parse_date(typo).is_err(), "{typo}");
            assert!(parse_month(typo).is_err(), "{typo}");
        }
        assert!(parse_date("2026-02-30").is_err());
        assert!(parse_month("2026-13").is_err());
    }

    #[test]
    fn too_many_buckets_is_none() {
        assert!(
            Granularity::Day
                .buckets(d("2026-01-01"), d("2036-01-10"), 3660)
                .is_none()
        );
        assert_eq!(
            Granularity::Day
                .buckets(d("2026-01-01"), d("2026-01-01"), 10)
                .unwrap()
                .len(),
            0
        );
    }
}
