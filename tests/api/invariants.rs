//! Invariants the database itself keeps, on both engines.

use std::collections::{BTreeSet, HashMap};

use chrono::Utc;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use tally::domain::entry::EntryRules;
use tally::domain::{Amount, EntryFilter, EntryInput};

use crate::both;
use crate::helpers::{TestApp, entry};

both!(
    the_database_refuses_to_update_or_delete_ledger_rows,
    amounts_survive_parse_store_read_format_unchanged
);

async fn the_database_refuses_to_update_or_delete_ledger_rows(app: TestApp) {
    app.post_entries(entry("acme", "api_requests", "5", "k1")).await;
    let update = app.execute_raw("UPDATE entries SET amount = 6").await;
    let message = update.expect_err("UPDATE must fail").to_string();
    assert!(message.contains("append-only"), "{message}");
    let delete = app.execute_raw("DELETE FROM entries").await;
    assert!(
        delete
            .expect_err("DELETE must fail")
            .to_string()
            .contains("append-only")
    );
    if app.backend == crate::helpers::Backend::Postgres {
        let truncate = app.execute_raw("TRUNCATE entries CASCADE").await;
        assert!(
            truncate
                .expect_err("TRUNCATE must fail")
                .to_string()
                .contains("append-only")
        );
    }
    assert_eq!(
        app.scalar_i64("SELECT CAST(SUM(amount) AS BIGINT) FROM entries").await,
        5
    );
}

/// Canonical decimal text for an amount of `minor` units with `decimals` digits.
fn canonical(minor: i64, decimals: u32) -> String {
    Amount::from_minor(minor, decimals).to_string()
}

async fn amounts_survive_parse_store_read_format_unchanged(app: TestApp) {
    // (resource, decimals): every precision the built-in catalog has.
    let resources = [("api_requests", 0u32), ("agent_minutes", 2)];
    let strategy = proptest::collection::vec(
        (
            0usize..2,
            prop_oneof![-999_999_999_999_999i64..=999_999_999_999_999, -1000i64..=1000],
        ),
        1..40,
    );
    let mut runner = proptest::test_runner::TestRunner::default();
    // Random batches drawn from the strategy; each goes through the real
    // validation and store and must read back as the same canonical text.
    for batch_no in 0..24 {
        let values = strategy.new_tree(&mut runner).unwrap().current();
        let mut expected = Vec::new();
        let mut inputs = Vec::new();
        for (i, (which, minor)) in values.into_iter().enumerate() {
            let (resource, decimals) = resources[which];
            // Amounts are whole units of 10^-decimals below 10^15 in magnitude.
            let minor = if decimals == 0 { minor } else { minor / 1000 };
            if minor == 0 {
                continue;
            }
            let text = canonical(minor, decimals);
            let mut body = entry("prop", resource, &text, &format!("b{batch_no}-{i}"));
            body["occurred_at"] = serde_json::json!(Utc::now().to_rfc3339());
            inputs.push(serde_json::from_value::<EntryInput>(body).unwrap());
            expected.push(text);
        }
        if inputs.is_empty() {
            continue;
        }
        let rules = EntryRules {
            catalog: &app.catalog,
            now: Utc::now(),
            late_horizon: chrono::Duration::days(35),
            allow_late: false,
        };
        let entries = tally::domain::entry::validate_batch(inputs, rules).expect("valid amounts");
        let outcomes = app.store.insert_entries(&entries).await.unwrap();
        let ids: BTreeSet<i64> = outcomes.iter().map(|o| o.id).collect();
        let stored = app
            .store
            .list_entries(&EntryFilter {
                after_id: Some(ids.first().unwrap() - 1),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        let by_id: HashMap<i64, String> = stored.iter().map(|e| (e.id, e.amount.to_string())).collect();
        // Outcomes come in request order (ids need not: PostgreSQL inserts in key order).
        let read: Vec<String> = outcomes.iter().map(|o| by_id[&o.id].clone()).collect();
        assert_eq!(read, expected);
    }
}

#[test]
fn the_two_migration_folders_mirror_each_other() {
    let names = |engine: &str| -> Vec<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(engine);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let sqlite = names("sqlite");
    assert!(!sqlite.is_empty());
    assert_eq!(
        sqlite,
        names("postgres"),
        "same versions, same names in migrations/sqlite and migrations/postgres"
    );
}

proptest! {
    #[test]
    fn formatting_then_parsing_an_amount_is_the_identity(minor in -999_999_999_999_999i64..=999_999_999_999_999, decimals in 0u32..=3) {
        prop_assume!(minor != 0);
        let amount = Amount::from_minor(minor / 10i64.pow(decimals), decimals);
        prop_assume!(amount.minor() != 0);
        let parsed = Amount::parse(&amount.to_string(), decimals).unwrap();
        prop_assert_eq!(parsed, amount);
    }
}
