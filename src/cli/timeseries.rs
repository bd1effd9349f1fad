//! `tally timeseries`.

use std::process::ExitCode;

use crate::app::Settings;
use crate::domain::AccountId;
use crate::domain::period::{Granularity, parse_date};
use crate::usage::timeseries::timeseries as series;

/// Arguments of `tally timeseries`.
#[derive(Debug, clap::Args)]
pub struct TimeseriesArgs {
    /// Account id.
    account: String,
    /// Resource name.
    resource: String,
    /// Bucket size.
    #[arg(long, value_enum, default_value = "day")]
    granularity: Granularity,
    /// First bucket (inclusive): YYYY-MM-DD, or YYYY-MM for its first day.
    #[arg(long, value_parser = parse_date)]
    from: chrono::NaiveDate,
    /// End (exclusive): YYYY-MM-DD, or YYYY-MM for its first day.
    #[arg(long, value_parser = parse_date)]
    to: chrono::NaiveDate,
}

/// Prints `start,amount` lines, zero-filled.
pub async fn timeseries(settings: &Settings, args: TimeseriesArgs) -> anyhow::Result<ExitCode> {
    let (store, catalog) = settings.open_existing_store().await?;
    let account = AccountId::parse(&args.account).map_err(anyhow::Error::msg)?;
    let resource = super::readable_resource(store.as_ref(), &catalog, Some(&account), &args.resource).await?;
    let points = series(
        store.as_ref(),
        &catalog,
        &account,
        &resource,
        args.granularity,
        args.from,
        args.to,
    )
    .await?;
    outln!("start,amount")?;
    for point in points {
        outln!("{},{}", point.start, point.amount)?;
    }
    Ok(ExitCode::SUCCESS)
}
