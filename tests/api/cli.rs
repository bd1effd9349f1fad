//! The command line, run as a real process against the test's database.

use std::process::Command;

use serde_json::json;

use crate::both;
use crate::helpers::TestApp;

both!(
    keys_create_prints_only_the_key_which_then_authenticates,
    post_appends_an_entry_and_refuses_bad_input,
    import_loads_valid_rows_and_reports_rejected_lines,
    import_follows_reversals_to_their_new_ids,
);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn keys_create_prints_only_the_key_which_then_authenticates(app: TestApp) {
    let output = app.cli(&["keys", "create", "--role", "service", "--name", "ci"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let lines: Vec<_> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "only the key on stdout: {stdout:?}");
    let key = lines[0];
    let body = json!({"account": "acme", "resource": "api_requests", "amount": "1", "idempotency_key": "k"});
    let reply = app
        .request("POST", "/v1/entries", Some(key), Some(body.to_string()))
        .await;
    assert_eq!(reply.status, 200);

    let listed = app.cli(&["keys", "list"]);
    let listing = text(&listed.stdout);
    assert!(listing.contains("service") && listing.contains("ci"), "{listing}");
    assert!(!listing.contains(key), "listings never show a plaintext key");

    let reader = app.cli(&["keys", "create", "--role", "reader"]);
    assert!(!reader.status.success(), "a reader needs --account");
    assert!(text(&reader.stderr).contains("--account"));
}

async fn post_appends_an_entry_and_refuses_bad_input(app: TestApp) {
    let ok = app.cli(&["post", "acme", "agent_minutes", "1.25", "--key", "cli-1"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).starts_with("created entry"));
    let again = app.cli(&["post", "acme", "agent_minutes", "1.25", "--key", "cli-1"]);
    assert!(text(&again.stdout).starts_with("duplicate of entry"));
    let negative = app.cli(&["post", "acme", "storage_bytes", "-100"]);
    assert!(negative.status.success(), "{}", text(&negative.stderr));
    let bad = app.cli(&["post", "acme", "tokens", "1"]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("resource 'tokens' is not in the catalog"));
    assert_eq!(app.count_entries().await, 2);
}

async fn import_loads_valid_rows_and_reports_rejected_lines(app: TestApp) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("entries.csv");
    let recent = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    let old = "2020-01-01T00:00:00Z";
    std::fs::write(
        &file,
        format!(
            "id,account,resource,amount,occurred_at,recorded_at,idempotency_key,source,reverses,metadata\n\
             1,acme,api_requests,10,{recent},,k1,import,,\"{{\"\"note\"\": \"\"a, b\"\"}}\"\n\
             2,acme,tokens,10,{recent},,k2,import,,\n\
             3,acme,api_requests,0,{recent},,k3,import,,\n\
             4,acme,api_requests,5,{old},,k4,import,,\n\
             5,acme,api_requests,10,{recent},,k1,import,,\n"
        ),
    )
    .unwrap();
    let output = app.cli(&["import", file.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "rejected rows make the exit code 1: {stderr}"
    );
    assert!(stderr.contains("1 created, 1 duplicate, 3 rejected"), "{stderr}");
    assert!(stderr.contains("line 3: resource: resource 'tokens'"), "{stderr}");
    assert!(stderr.contains("line 4: amount"), "{stderr}");
    assert!(stderr.contains("line 5: occurred_at"), "{stderr}");
    assert_eq!(app.count_entries().await, 1);

    let backfill = app.cli(&["import", "--allow-late", file.to_str().unwrap()]);
    assert!(
        text(&backfill.stderr).contains("1 created, 2 duplicate, 2 rejected"),
        "{}",
        text(&backfill.stderr)
    );
    assert_eq!(app.count_entries().await, 2);
    let listed = app.get("/v1/accounts/acme/entries").await;
    assert_eq!(listed.body["entries"][0]["metadata"], json!({"note": "a, b"}));
}

async fn import_follows_reversals_to_their_new_ids(app: TestApp) {
    // Take an id so the file's ids and the ledger's differ.
    app.post_entries(json!({"account": "x", "resource": "api_requests", "amount": "1", "idempotency_key": "pad"}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("entries.csv");
    let at = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    std::fs::write(
        &file,
        format!(
            "id,account,resource,amount,occurred_at,recorded_at,idempotency_key,source,reverses,metadata\n\
             1,acme,api_requests,7,{at},,orig,,,\n\
             2,acme,api_requests,-7,{at},,undo,reversal,1,\n\
             3,acme,api_requests,-1,{at},,stray,reversal,999,\n\
             4,acme,llm_tokens,3,{at},,o2,,,\n\
             5,bob,llm_tokens,-3,{at},,wrong-account,reversal,4,\n\
             6,acme,api_requests,7,{at},,undo-undo,reversal,2,\n"
        ),
    )
    .unwrap();
    let output = app.cli(&["import", file.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 4: reverses 999, which is not an entry imported from this file"),
        "{stderr}"
    );
    // The API's rules for a reversal hold for imported ones too.
    assert!(
        stderr.contains("line 6: reverses 4, but a reversal of it is acme llm_tokens -3"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 7: entry ") && stderr.contains("is itself the reversal of entry"),
        "{stderr}"
    );
    assert!(stderr.contains("3 created, 0 duplicate, 3 rejected"), "{stderr}");
    assert_eq!(
        app.get("/v1/accounts/bob/entries").await.body["entries"],
        json!([]),
        "nothing written for the refused rows"
    );
    let listed = app.get("/v1/accounts/acme/entries").await;
    let rows = listed.body["entries"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let by_key = |key: &str| rows.iter().find(|r| r["idempotency_key"] == key).unwrap();
    assert_eq!(by_key("undo")["reverses"], by_key("orig")["id"]);
}

#[test]
fn plans_check_reports_each_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plans.toml");
    std::fs::write(
        &file,
        "default_plan = \"free\"\n\n[resources.api_requests]\ndecimals = 0\n\n[plans.free]\nprice = \"0\"\n\n[plans.free.limits.tokens]\nwindow = \"day\"\nlimit = \"10\"\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["plans", "check", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr
            .contains("plans.toml:9: plan 'free' limits resource 'tokens', which is not declared; known: api_requests"),
        "{stderr}"
    );

    let builtin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/domain/builtin_catalog.toml");
    let ok = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["plans", "check", builtin.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", text(&ok.stderr));
}
