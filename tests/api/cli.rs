//! The command line, run as a real process against the test's database.

use std::process::Command;

use serde_json::json;

use crate::both;
use crate::helpers::{Backend, TestApp, entry, fresh_database, scalar_i64_at};

both!(
    keys_create_prints_only_the_key_which_then_authenticates,
    post_appends_an_entry_and_refuses_bad_input,
    import_loads_valid_rows_and_reports_rejected_lines,
    import_follows_reversals_to_their_new_ids,
    import_refuses_a_reversal_of_another_amount_or_instant,
    import_refuses_a_header_with_an_unknown_or_repeated_column_and_writes_nothing,
    import_reports_rejected_lines_in_file_order_by_line_not_batch_position,
    import_lists_the_first_thousand_rejected_lines_and_counts_the_rest,
    import_names_the_files_own_lines_with_crlf_endings_blank_lines_and_quoted_newlines,
    import_reads_a_pipe_once_and_loads_every_row,
    import_counts_lone_cr_line_ends_and_notes_a_double_quote_left_open,
    keys_revoke_makes_the_key_401_from_then_on,
    keys_list_keeps_its_columns_in_line_and_a_name_on_one_line,
    keys_are_stored_hashed_and_the_plaintext_is_nowhere_in_the_keys_table,
    migrate_creates_the_schema_on_a_fresh_database_and_a_second_run_changes_nothing,
    processes_migrating_a_new_database_at_once_all_start_and_one_creates_the_schema,
    a_reader_that_stops_reading_ends_the_output_quietly_with_the_commands_own_exit_code,
    reads_of_a_database_that_is_not_there_fail_and_create_nothing,
    a_rust_log_that_does_not_parse_is_said_not_silently_replaced,
    a_catalog_that_changes_the_digits_of_stored_amounts_is_refused,
    first_opens_that_give_a_new_resource_different_digits_at_once_let_one_write,
);

/// Review AT: two first opens with different digits for a new resource at
/// once both went on (the last record won), each writing at its own scale.
/// The first record now wins and each open is judged on it: one writes.
async fn first_opens_that_give_a_new_resource_different_digits_at_once_let_one_write(app: TestApp) {
    let dir = tempfile::tempdir().unwrap();
    let builtin = tally::domain::catalog::BUILTIN_CATALOG_TOML;
    let rounds = 6;
    // Each round's catalogs add one resource new to the database.
    let catalog = |round: usize, digits: u32| {
        let path = dir.path().join(format!("round{round}-digits{digits}.toml"));
        std::fs::write(
            &path,
            format!("{builtin}\n[resources.race{round}]\ndecimals = {digits}\n"),
        )
        .unwrap();
        path
    };
    for round in 0..rounds {
        let resource = format!("race{round}");
        let post = |plans: &std::path::Path, amount: &str, key: &str| {
            Command::new(env!("CARGO_BIN_EXE_tally"))
                .args(["post", "racer", &resource, amount, "--key", key])
                .env("TALLY_DATABASE_URL", &app.database_url)
                .env("TALLY_PLANS", plans)
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (one, two) = (catalog(round, 1), catalog(round, 2));
        let (a, b) = (
            post(&one, "1.5", &format!("a{round}")),
            post(&two, "1.55", &format!("b{round}")),
        );
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let written = [&a, &b].iter().filter(|o| o.status.success()).count();
        assert_eq!(written, 1, "round {round}: {a:?} {b:?}");
        let digits = app
            .scalar_i64(&format!(
                "SELECT CAST(digits AS BIGINT) FROM resource_digits WHERE resource = '{resource}'"
            ))
            .await;
        let winner = if a.status.success() { 1 } else { 2 };
        assert_eq!(digits, winner, "round {round}: the recorded digits are the writer's");
    }
}

/// Review AP: amounts are stored as integers of the resource's minor unit, so
/// a catalog that changes a resource's `decimals` would read them at another
/// scale (1.25 as 0.125). Every command refuses it, naming the resource and
/// the way back, while a resource that holds nothing may change.
async fn a_catalog_that_changes_the_digits_of_stored_amounts_is_refused(app: TestApp) {
    let builtin = tally::domain::catalog::BUILTIN_CATALOG_TOML;
    let posted = app.post_entries(entry("acme", "agent_minutes", "1.25", "k1")).await;
    assert_eq!(posted.status, 200, "{:?}", posted.body);
    let dir = tempfile::tempdir().unwrap();
    let thousandths = dir.path().join("thousandths.toml");
    let agent_minutes = "[resources.agent_minutes]\ndecimals = 2";
    assert!(builtin.contains(agent_minutes));
    std::fs::write(
        &thousandths,
        builtin.replace(agent_minutes, "[resources.agent_minutes]\ndecimals = 3"),
    )
    .unwrap();
    for args in [
        &["check", "acme", "agent_minutes"][..],
        &["export", "entries", "--from", "2020-01-01", "--to", "2030-01-01"],
    ] {
        let refused = app.cli_with_plans(&thousandths, args);
        let stderr = text(&refused.stderr);
        assert!(!refused.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains(
                "resource 'agent_minutes' has decimals = 3 in the catalog, but this database stores its amounts \
                 with 2 fractional digits: this catalog would read each one 10 times smaller; put back decimals = 2"
            ),
            "{args:?}: {stderr}"
        );
        assert!(text(&refused.stdout).is_empty(), "{args:?}: nothing read");
    }
    // llm_tokens holds nothing yet: its digits may change, and are then
    // those its amounts are stored with; but only `serve` records that
    // (review AS: a command beside a server on the old catalog changed them
    // under it).
    let llm_tokens = "[resources.llm_tokens]\ndecimals = 0";
    assert!(builtin.contains(llm_tokens));
    let fractional_tokens = dir.path().join("fractional_tokens.toml");
    std::fs::write(
        &fractional_tokens,
        builtin.replace(llm_tokens, "[resources.llm_tokens]\ndecimals = 1"),
    )
    .unwrap();
    let beside = app.cli_with_plans(&fractional_tokens, &["check", "acme", "llm_tokens"]);
    assert!(!beside.status.success());
    assert!(
        text(&beside.stderr).contains(
            "resource 'llm_tokens' has decimals = 1 in the catalog, but this database records 0 for it; it holds no \
             amounts yet, so its digits may change, but only `serve` records them"
        ),
        "{beside:?}"
    );
    let mut serve = crate::helpers::ServeProcess::start(
        &app.database_url,
        &["--no-jobs"],
        &[
            ("TALLY_PLANS", fractional_tokens.to_str().unwrap()),
            ("TALLY_ADMIN_KEY", "k"),
        ],
    )
    .await;
    assert!(serve.stop().await.success(), "{}", serve.stderr());
    let half = app.cli_with_plans(
        &fractional_tokens,
        &["post", "acme", "llm_tokens", "0.5", "--key", "half"],
    );
    assert!(half.status.success(), "{}", text(&half.stderr));
    let plain = app.cli(&["check", "acme", "llm_tokens"]);
    assert!(!plain.status.success());
    assert!(
        text(&plain.stderr).contains("resource 'llm_tokens' has decimals = 0 in the catalog, but this database stores \
             its amounts with 1 fractional digit: this catalog would read each one 10 times larger; put back decimals = 1"),
        "{}",
        text(&plain.stderr)
    );
    let fine = app.cli_with_plans(&fractional_tokens, &["check", "acme", "llm_tokens"]);
    assert!(text(&fine.stdout).contains("\"used\": \"0.5\""), "{fine:?}");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes an import file (the entries export's header, then `rows`) into a
/// fresh folder; the folder lives as long as the returned guard.
fn entries_csv(rows: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("entries.csv");
    std::fs::write(
        &file,
        format!("id,account,resource,amount,occurred_at,recorded_at,idempotency_key,source,reverses,metadata\n{rows}"),
    )
    .unwrap();
    (dir, file)
}

/// `tally … | head -1`: once the reader has gone, writes fail with
/// EPIPE. The command drops the rest of its output, does not panic, and ends
/// with its own exit code (for `check`, 1 still means refused).
async fn a_reader_that_stops_reading_ends_the_output_quietly_with_the_commands_own_exit_code(app: TestApp) {
    app.post_entries(json!({"account": "acme", "resource": "ai_generations", "amount": 50, "idempotency_key": "all"}))
        .await;
    for (args, code) in [
        (&["plans", "show"][..], 0),
        (&["keys", "list"][..], 0),
        (&["check", "acme", "api_requests"][..], 0),
        (&["check", "acme", "ai_generations"][..], 1),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .env("TALLY_DATABASE_URL", &app.database_url)
            .env_remove("TALLY_PLANS")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The read end closes before the command has written a line.
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
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
    let conflict = app.cli(&["post", "acme", "agent_minutes", "2", "--key", "cli-1"]);
    assert!(!conflict.status.success());
    let stderr = text(&conflict.stderr);
    assert!(stderr.contains("idempotency_key 'cli-1'"), "{stderr}");
    assert!(!stderr.contains("entry 0"), "no batch position for one entry: {stderr}");
    // Review Y: the flag's name, once, not the body field's ("occurred_at: occurred_at …").
    let old = app.cli(&["post", "acme", "api_requests", "1", "--at", "2020-01-01T00:00:00Z"]);
    assert_eq!(old.status.code(), Some(2));
    let stderr = text(&old.stderr);
    assert!(
        stderr.starts_with("error: --at 2020-01-01T00:00:00Z is older than"),
        "{stderr}"
    );
    assert!(!stderr.contains("occurred_at"), "{stderr}");
    // Review AP: a retry whose --at has since passed the horizon (here the
    // horizon shrinks instead) is a duplicate; a new key that old is too late.
    let ten_days_ago = (chrono::Utc::now() - chrono::Duration::days(10)).to_rfc3339();
    let dated = [
        "post",
        "acme",
        "api_requests",
        "1",
        "--at",
        &ten_days_ago,
        "--key",
        "cli-dated",
    ];
    assert!(app.cli(&dated).status.success());
    let retried = app.cli(&[&dated[..], &["--late-horizon-days", "5"]].concat());
    assert!(text(&retried.stdout).starts_with("duplicate of entry"), "{retried:?}");
    let new_key = [
        "post",
        "acme",
        "api_requests",
        "1",
        "--at",
        &ten_days_ago,
        "--key",
        "cli-new",
        "--late-horizon-days",
        "5",
    ];
    let refused = app.cli(&new_key);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        text(&refused.stderr).contains("is older than the late-arrival horizon of 5 days"),
        "{refused:?}"
    );
    // Review AL: the advice too names the flag, and the clock is this machine's.
    let ahead = app.cli(&["post", "acme", "api_requests", "1", "--at", "2099-01-01T00:00:00Z"]);
    assert_eq!(ahead.status.code(), Some(2));
    let stderr = text(&ahead.stderr);
    assert!(
        stderr.starts_with("error: --at 2099-01-01T00:00:00Z is more than 5 minutes ahead of this machine's clock"),
        "{stderr}"
    );
    assert!(stderr.contains("leave --at out"), "{stderr}");
    assert!(
        !stderr.contains("occurred_at") && !stderr.contains("server"),
        "{stderr}"
    );
    let date = app.cli(&["post", "acme", "api_requests", "1", "--at", "2026-12-01"]);
    let stderr = text(&date.stderr);
    assert!(stderr.starts_with("error: --at: \"2026-12-01\""), "{stderr}");
    let zero = app.cli(&["post", "acme", "api_requests", "0"]);
    assert_eq!(zero.status.code(), Some(2));
    let stderr = text(&zero.stderr);
    assert!(
        stderr.contains("amount must not be zero: an entry records a change"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("fractional"),
        "precision is beside the point: {stderr}"
    );
    let negative = app.cli(&["post", "acme", "storage_bytes", "-100"]);
    assert!(negative.status.success(), "{}", text(&negative.stderr));
    let bad = app.cli(&["post", "acme", "tokens", "1"]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("resource 'tokens' is not in the catalog"));
    assert_eq!(app.count_entries().await, 3, "cli-1, cli-dated and the negative one");
}

async fn import_loads_valid_rows_and_reports_rejected_lines(app: TestApp) {
    let recent = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    let old = "2020-01-01T00:00:00Z";
    let (_dir, file) = entries_csv(&format!(
        "\
         1,acme,api_requests,10,{recent},,k1,import,,\"{{\"\"note\"\": \"\"a, b\"\"}}\"\n\
         2,acme,tokens,10,{recent},,k2,import,,\n\
         3,acme,api_requests,0,{recent},,k3,import,,\n\
         4,acme,api_requests,5,{old},,k4,import,,\n\
         5,acme,api_requests,10,{recent},,k1,import,,\n"
    ));
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
    assert!(
        stderr.contains("line 5: occurred_at")
            && stderr.contains("import it with --allow-late to backfill rows that old"),
        "{stderr}"
    );
    assert_eq!(app.count_entries().await, 1);

    let backfill = app.cli(&["import", "--allow-late", file.to_str().unwrap()]);
    assert!(
        text(&backfill.stderr).contains("1 created, 2 duplicate, 2 rejected"),
        "{}",
        text(&backfill.stderr)
    );
    assert_eq!(app.count_entries().await, 2);
    // Review AP: run again without --allow-late, the old row, now in the
    // ledger, is a duplicate like the others, not too late.
    let rerun = app.cli(&["import", file.to_str().unwrap()]);
    assert!(
        text(&rerun.stderr).contains("0 created, 3 duplicate, 2 rejected"),
        "{}",
        text(&rerun.stderr)
    );
    assert_eq!(app.count_entries().await, 2);
    let listed = app.get("/v1/accounts/acme/entries").await;
    assert_eq!(listed.body["entries"][0]["metadata"], json!({"note": "a, b"}));
    // Review AQ: a row ahead of the clock is judged by this machine's.
    let (_dir, ahead) = entries_csv("1,acme,api_requests,1,2099-01-01T00:00:00Z,,k9,,,\n");
    let ahead = app.cli(&["import", ahead.to_str().unwrap()]);
    let stderr = text(&ahead.stderr);
    assert!(
        stderr.contains("this machine's clock") && !stderr.contains("server"),
        "{stderr}"
    );
    // Review AT: a reversal of a row refused as too late is told so, not
    // to sort the file.
    let (_dir, reversed) = entries_csv(
        "1,acme,api_requests,5,2020-01-01T00:00:00Z,,old-1,,,\n2,acme,api_requests,-5,2020-01-01T00:00:00Z,,old-2,,1,\n",
    );
    let reversed = app.cli(&["import", reversed.to_str().unwrap()]);
    let stderr = text(&reversed.stderr);
    assert!(
        stderr.contains("line 3: reverses 1, whose row (line 2) was rejected") && !stderr.contains("sort the file"),
        "{stderr}"
    );
    // Review AQ: a folder is named as one, with the path.
    let folder = tempfile::tempdir().unwrap();
    let refused = app.cli(&["import", folder.path().to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains(&format!(
            "{} is a folder; give tally import a CSV file",
            folder.path().display()
        )),
        "{refused:?}"
    );
}

/// A key reused with another amount is found when the batch is written
/// (after the lines rejected while reading): the report still lists lines in
/// file order, and names the line, not a position in a retried batch.
async fn import_reports_rejected_lines_in_file_order_by_line_not_batch_position(app: TestApp) {
    let at = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    let (_dir, file) = entries_csv(&format!(
        "\
         1,acme,api_requests,7,{at},,a,,,\n\
         2,acme,api_requests,8,{at},,a,,,\n\
         3,acme,tokens,1,{at},,b,,,\n\
         4,acme,api_requests,-1,{at},,c,,9,\n"
    ));
    let output = app.cli(&["import", file.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let rejected: Vec<&str> = stderr.lines().filter(|l| l.trim_start().starts_with("line ")).collect();
    assert_eq!(rejected.len(), 3, "{stderr}");
    assert!(
        rejected[0].trim_start().starts_with("line 3: idempotency_key 'a'"),
        "{stderr}"
    );
    assert!(rejected[1].trim_start().starts_with("line 4: resource"), "{stderr}");
    assert!(
        rejected[2].contains("line 5: reverses 9") && rejected[2].contains("sort the file by id"),
        "{stderr}"
    );
    assert_eq!(app.count_entries().await, 1);
}

/// The wrong file can be millions of bad rows: the first 1 000 by line are
/// listed (a key conflict found when the batch is written, after the rows
/// below it, still comes first) and the rest only counted.
async fn import_lists_the_first_thousand_rejected_lines_and_counts_the_rest(app: TestApp) {
    let at = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    let mut rows = format!("1,acme,api_requests,1,{at},,g,,,\n2,acme,api_requests,2,{at},,g,,,\n");
    for id in 3..=1502 {
        rows.push_str(&format!("{id},acme,tokens,1,{at},,t{id},,,\n"));
    }
    let (_dir, file) = entries_csv(&rows);
    let output = app.cli(&["import", file.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("1 created, 0 duplicate, 1501 rejected"), "{stderr}");
    let listed: Vec<&str> = stderr.lines().filter(|l| l.trim_start().starts_with("line ")).collect();
    assert_eq!(listed.len(), 1_000, "{stderr}");
    assert!(
        listed[0].trim_start().starts_with("line 3: idempotency_key 'g'"),
        "{stderr}"
    );
    assert!(listed[1].trim_start().starts_with("line 4: resource"), "{stderr}");
    assert!(listed[999].trim_start().starts_with("line 1002: resource"), "{stderr}");
    assert!(
        stderr.contains("… and 501 more rejected rows, not listed (the first 1000 by line are)"),
        "{stderr}"
    );
    assert_eq!(app.count_entries().await, 1);
}

/// Excel and Windows tools write CRLF; people leave blank lines; metadata
/// holds newlines in quotes. A rejected row is named by the line an editor
/// shows it on (the csv crate's own count is off after CRLF and blank lines).
async fn import_names_the_files_own_lines_with_crlf_endings_blank_lines_and_quoted_newlines(app: TestApp) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("corrections.csv");
    let rows = [
        "account,resource,amount,idempotency_key,metadata",
        "acme,api_requests,5,ok-1,",
        "acme,api_requests,x,bad-3,",
        "",
        "acme,api_requests,6,ok-5,\"{\"\"note\"\":\r\n\"\"over two lines\"\"}\"",
        "",
        "",
        "acme,api_requests,y,bad-9,",
        "acme,tokens,1,bad-10,",
        "acme,api_requests,1,bad-11,{}",
        "acme,api_requests,1,bad-12,,too many",
        "acme,api_requests,1,bad-13,\u{FFFD}",
    ];
    let mut bytes = (rows.join("\r\n") + "\r\n").into_bytes();
    // Line 13's metadata: a byte that is not UTF-8 where the text has U+FFFD.
    let replacement = bytes.windows(3).position(|w| w == "\u{FFFD}".as_bytes()).unwrap();
    bytes.splice(replacement..replacement + 3, [0xE9]);
    std::fs::write(&file, bytes).unwrap();
    let output = app.cli(&["import", file.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let rejected: Vec<&str> = stderr
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("line "))
        .collect();
    assert_eq!(rejected.len(), 5, "{stderr}");
    assert!(rejected[0].starts_with("line 3: amount"), "{stderr}");
    assert!(rejected[1].starts_with("line 9: amount"), "{stderr}");
    assert!(rejected[2].starts_with("line 10: resource"), "{stderr}");
    // The csv crate's own words carry its own (wrong) line count: not quoted.
    assert_eq!(
        rejected[3],
        "line 12: unreadable CSV row: it has 6 fields where the header has 5 (a missing or extra comma, a \
         field with a comma that is not in double quotes, or a double quote left open?)",
        "{stderr}"
    );
    assert_eq!(
        rejected[4], "line 13: unreadable CSV row: field 5 is not UTF-8; save the file as UTF-8",
        "{stderr}"
    );
    assert_eq!(app.count_entries().await, 3);
}

/// Review T: old Mac files end lines with a lone CR, which the csv reader
/// ends records on too; and a double quote left open takes the rows after it
/// into one field, which CSV allows, so the import says where to look.
async fn import_counts_lone_cr_line_ends_and_notes_a_double_quote_left_open(app: TestApp) {
    let dir = tempfile::tempdir().unwrap();
    let import = |name: &str, bytes: &[u8]| {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        let output = app.cli(&["import", file.to_str().unwrap()]);
        let stderr = text(&output.stderr);
        let lines: Vec<String> = stderr
            .lines()
            .map(str::trim_start)
            .filter(|l| l.starts_with("line "))
            .map(str::to_owned)
            .collect();
        (output.status.code(), lines, stderr)
    };
    let (code, lines, stderr) = import(
        "mac.csv",
        b"account,resource,amount,idempotency_key\racme,api_requests,1,m1\racme,api_requests,x,m2\r\r\racme,api_requests,y,m3\r",
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[0].starts_with("line 3: amount"), "{stderr}");
    assert!(lines[1].starts_with("line 6: amount"), "{stderr}");
    // A CR alone, then CRLF: two line ends.
    let (_, lines, stderr) = import(
        "mixed.csv",
        b"account,resource,amount,idempotency_key\r\r\nacme,api_requests,x,x1\n",
    );
    assert!(lines[0].starts_with("line 3: amount"), "{stderr}");

    let (code, lines, stderr) = import(
        "quote.csv",
        b"account,resource,amount,idempotency_key,source\nacme,api_requests,1,q0,\"oops,\nacme,api_requests,5,q1,\nacme,api_requests,7,q2,\"\nacme,api_requests,2,q3,\n",
    );
    assert_eq!(code, Some(0), "CSV allows it: {stderr}");
    assert!(stderr.contains("2 created, 0 duplicate, 0 rejected"), "{stderr}");
    assert_eq!(
        lines,
        [
            "line 2: note: source holds a line break, so this row runs to line 4; if a double quote was left \
          open there, the rows on those lines went into that field: check the file"
        ],
        "{stderr}"
    );
    // Left open to the end of the file: the row runs to the file's last line.
    let (_, lines, stderr) = import(
        "open.csv",
        b"account,resource,amount,idempotency_key,source\nacme,api_requests,1,o0,\"oops\nacme,api_requests,5,o1,\nacme,api_requests,7,o2,\n",
    );
    assert!(
        lines.len() == 1
            && lines[0].starts_with("line 2: note: source holds a line break, so this row runs to line 4;"),
        "{stderr}"
    );
    // Left open in a middle column: the row then has too few fields, and
    // its rejection says which lines went into it (CRLF and a lone CR too).
    for (name, end) in [
        ("middle.csv", "\n"),
        ("middle-crlf.csv", "\r\n"),
        ("middle-cr.csv", "\r"),
    ] {
        let file = [
            "account,resource,amount,idempotency_key,source",
            "acme,api_requests,\"1,m0,s",
            "acme,api_requests,5,m1,s",
            "acme,api_requests,7,m2,s",
            "",
        ]
        .join(end);
        let (code, lines, stderr) = import(name, file.as_bytes());
        assert_eq!(code, Some(1), "{stderr}");
        assert_eq!(
            lines,
            [
                "line 2: unreadable CSV row: it runs to line 4 and has 3 fields where the header has 5; a double \
                 quote left open takes the lines after it into one field, so the rows on lines 3 to 4 were not read \
                 either: close the quote and import the file again"
            ],
            "{name}: {stderr}"
        );
    }
    // Review Y: one row taken in is "the row on line 3", not "lines 3 to 3".
    let (_, lines, stderr) = import(
        "one.csv",
        b"account,resource,amount,idempotency_key,source\nacme,api_requests,\"1,m0,s\nacme,api_requests,5,m1,s\n",
    );
    assert_eq!(
        lines,
        [
            "line 2: unreadable CSV row: it runs to line 3 and has 3 fields where the header has 5; a double quote \
          left open takes the lines after it into one field, so the row on line 3 was not read either: close the \
          quote and import the file again"
        ],
        "{stderr}"
    );
    let (_, lines, stderr) = import(
        "json.csv",
        b"account,resource,amount,idempotency_key,metadata\nacme,api_requests,1,j1,\"{\"\"a\"\" 1}\"\n",
    );
    assert_eq!(
        lines,
        ["line 2: metadata is not JSON: expected `:` at line 1 column 6 of the field"],
        "{stderr}"
    );
    // Review AL: a quote left open in metadata, the last column, takes the
    // rows after it into that field; the rejection says which.
    let (code, lines, stderr) = import(
        "open-metadata.csv",
        b"account,resource,amount,idempotency_key,metadata\nacme,api_requests,1,j2,\"{\"\"a\"\":1}\nacme,api_requests,5,j3,\nacme,api_requests,7,j4,\n",
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        lines,
        [
            "line 2: metadata is not JSON: trailing characters at line 2 column 1 of the field, which runs to \
             line 4; if a double quote was left open there, the rows on lines 3 to 4 were taken into it and not \
             imported: close the quote and import the file again"
        ],
        "{stderr}"
    );
    // JSON spread over lines is JSON: taken, without a note.
    let (code, lines, stderr) = import(
        "pretty-metadata.csv",
        b"account,resource,amount,idempotency_key,metadata\nacme,api_requests,1,j5,\"{\n  \"\"a\"\": 1\n}\"\n",
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(lines.is_empty(), "{stderr}");
    // Review AL: an id or reverses that is not a number is rejected, quoted
    // (an id was ignored); a note comes in line order among the rejections
    // (notes came after every rejection).
    let (code, lines, stderr) = import(
        "ids.csv",
        b"id,account,resource,amount,idempotency_key,source,reverses\n\
          abc,acme,api_requests,1,i1,,\n\
          7,acme,api_requests,1,i2,\"two\nlines\",\n\
          8,acme,api_requests,-1,i3,,x7\n\
          9223372036854775808,acme,api_requests,1,i4,,\n",
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        lines,
        [
            "line 2: id 'abc' is not an entry id; ids are whole numbers, as `tally export entries` writes them",
            "line 3: note: source holds a line break, so this row runs to line 4; if a double quote was left open \
             there, the rows on those lines went into that field: check the file",
            "line 5: reverses 'x7' is not an entry id; ids are whole numbers, as `tally export entries` writes them",
            "line 6: id '9223372036854775808' is not an entry id; ids fit 64 bits (at most 9223372036854775807), as \
             `tally export entries` writes them",
        ],
        "{stderr}"
    );
}

/// Review S: `tally import /dev/stdin` (a pipe) once read the stream twice,
/// half the chunks each, and imported rows made of two chunks' pieces.
/// Review U: a byte-order mark alone in the pipe's first read made the file
/// look empty.
async fn import_reads_a_pipe_once_and_loads_every_row(app: TestApp) {
    use std::io::Write as _;
    let rows = 3_000;
    let mut csv = String::from("account,resource,amount,idempotency_key\n");
    for n in 1..=rows {
        // Line n + 1; the 2 000th row (line 2 001) is bad.
        let amount = if n == 2_000 {
            "x".to_owned()
        } else {
            (n % 97 + 1).to_string()
        };
        csv += &format!("acct-{},api_requests,{amount},key-{n:05}\n", n % 7);
    }
    let mut child = import_from_a_pipe(&app, "/dev/stdin");
    let mut stdin = child.stdin.take().unwrap();
    // A byte-order mark alone in the pipe first, as a slow writer sends it:
    // the csv reader looks for one only in its first read.
    let writer = std::thread::spawn(move || {
        stdin.write_all(b"\xEF\xBB\xBF")?;
        stdin.flush()?;
        std::thread::sleep(std::time::Duration::from_millis(200));
        stdin.write_all(csv.as_bytes())
    });
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("2999 created, 0 duplicate, 1 rejected"), "{stderr}");
    assert!(stderr.contains("line 2001: amount: \"x\""), "{stderr}");
    assert_eq!(app.count_entries().await, 2_999);
    let expected: i64 = (1..=rows).filter(|&n| n != 2_000).map(|n| n % 97 + 1).sum();
    let sum: i64 = sum_over_the_seven_accounts(&app).await;
    assert_eq!(sum, expected, "every amount as written");

    // `-` is standard input too, as `export -o -` is standard output.
    let mut dash = import_from_a_pipe(&app, "-");
    dash.stdin
        .take()
        .unwrap()
        .write_all(b"account,resource,amount,idempotency_key\nacct-0,api_requests,5,from-dash\n")
        .unwrap();
    let output = dash.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains("standard input: 1 created"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(app.count_entries().await, 3_000);

    // Review BN: `-` is descriptor 0 as it stands; reopening /dev/stdin read
    // a file from its first byte again, the line the shell had read too.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("after-a-preamble.csv");
    std::fs::write(
        &csv,
        "read by the shell first\naccount,resource,amount,idempotency_key\nacct-0,api_requests,5,after-read\n",
    )
    .unwrap();
    let output = Command::new("sh")
        .args([
            "-c",
            "read -r preamble; exec \"$0\" import -",
            env!("CARGO_BIN_EXE_tally"),
        ])
        .env("TALLY_DATABASE_URL", &app.database_url)
        .env("RUST_LOG", "warn")
        .stdin(std::fs::File::open(&csv).unwrap())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(app.count_entries().await, 3_001);
}

/// `tally import FILE` on `app`'s database, its standard input a pipe to
/// write the CSV into (and its output piped, for `wait_with_output`).
fn import_from_a_pipe(app: &TestApp, file: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["import", file])
        .env("TALLY_DATABASE_URL", &app.database_url)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

async fn sum_over_the_seven_accounts(app: &TestApp) -> i64 {
    let mut sum = 0;
    for account in 0..7 {
        sum += app.ledger_sum(&format!("acct-{account}"), "api_requests").await;
    }
    sum
}

/// A misspelt `occurred_at` must not date every row at import time.
async fn import_refuses_a_header_with_an_unknown_or_repeated_column_and_writes_nothing(app: TestApp) {
    let dir = tempfile::tempdir().unwrap();
    for (header, complaint) in [
        (
            "account,resource,amount,idempotency_key,ocurred_at",
            "a column \"ocurred_at\" that the import does not know",
        ),
        (
            "account,resource,amount,idempotency_key,account",
            "names the column \"account\" twice",
        ),
        ("account,resource,idempotency_key", "lacks the column amount;"),
        ("account,resource", "lacks the columns amount, idempotency_key;"),
        (
            "account,resource,amount,idempotency_key,",
            "a column without a name (a trailing comma?)",
        ),
    ] {
        let file = dir.path().join("typo.csv");
        std::fs::write(
            &file,
            format!("{header}\nacme,api_requests,5,typo,2026-11-02T00:00:00Z\n"),
        )
        .unwrap();
        let output = app.cli(&["import", file.to_str().unwrap()]);
        let stderr = text(&output.stderr);
        // 2: the import stopped; 1 would mean rows were rejected.
        assert_eq!(output.status.code(), Some(2), "{header}: {stderr}");
        assert!(stderr.contains(complaint), "{header}: {stderr}");
        assert!(
            complaint.contains("twice") || stderr.contains("id,account,resource,amount,occurred_at"),
            "names the columns: {stderr}"
        );
    }
    // A header that is not UTF-8 names its column from 1, as the rows do.
    let latin1 = dir.path().join("latin1.csv");
    std::fs::write(&latin1, b"account,resource,amount,idempotency_key,r\xE9f\n").unwrap();
    let output = app.cli(&["import", latin1.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("latin1.csv: the header row is not UTF-8 (column 5); save the file as UTF-8"),
        "{stderr}"
    );
    // An empty file (or a byte-order mark alone) says so.
    for (name, bytes) in [("empty.csv", &b""[..]), ("bom.csv", &b"\xEF\xBB\xBF"[..])] {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        let output = app.cli(&["import", file.to_str().unwrap()]);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("{name} is empty; an import needs a header row")),
            "{stderr}"
        );
    }
    assert_eq!(app.count_entries().await, 0);
}

async fn import_follows_reversals_to_their_new_ids(app: TestApp) {
    // Take an id so the file's ids and the ledger's differ.
    app.post_entries(json!({"account": "x", "resource": "api_requests", "amount": "1", "idempotency_key": "pad"}))
        .await;
    let at = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    let (_dir, file) = entries_csv(&format!(
        "\
         1,acme,api_requests,7,{at},,orig,,,\n\
         2,acme,api_requests,-7,{at},,undo,reversal,1,\n\
         3,acme,api_requests,-1,{at},,stray,reversal,999,\n\
         4,acme,llm_tokens,3,{at},,o2,,,\n\
         5,bob,llm_tokens,-3,{at},,wrong-account,reversal,4,\n\
         6,acme,api_requests,7,{at},,undo-undo,reversal,2,\n\
         7,acme,api_requests,-7,{at},,undo-again,reversal,1,\n"
    ));
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
    // In the file's ids, not the ledger's (which the file's reader never saw).
    assert!(
        stderr.contains("line 7: reverses 2, which is itself a reversal"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 8: id 1 is already reversed; a second reversal would count the correction twice"),
        "{stderr}"
    );
    assert!(stderr.contains("3 created, 0 duplicate, 4 rejected"), "{stderr}");
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

    // Review AL: an id two entries of the file hold names neither; a line
    // repeated whole is one entry and its id still names it.
    let (_dir, file) = entries_csv(&format!(
        "\
         10,dup,api_requests,5,{at},,d1,,,\n\
         10,dup,llm_tokens,7,{at},,d2,,,\n\
         11,dup,api_requests,-5,{at},,d3,reversal,10,\n\
         20,dup,api_requests,2,{at},,same,,,\n\
         20,dup,api_requests,2,{at},,same,,,\n\
         21,dup,api_requests,-2,{at},,same-undo,reversal,20,\n"
    ));
    let output = app.cli(&["import", file.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 4: reverses 10, but several rows imported from this file have id 10"),
        "{stderr}"
    );
    assert!(stderr.contains("4 created, 1 duplicate, 1 rejected"), "{stderr}");
    let listed = app.get("/v1/accounts/dup/entries").await;
    let rows = listed.body["entries"].as_array().unwrap();
    let by_key = |key: &str| rows.iter().find(|r| r["idempotency_key"] == key).unwrap();
    assert_eq!(by_key("same-undo")["reverses"], by_key("same")["id"]);
    assert_eq!(rows.len(), 4, "{rows:?}");
}

/// Review BF: an imported reversal is the exact opposite of its target, in
/// its bucket, as the API's is: another amount or instant would link a
/// partial or misdated correction to the entry and take its one reversal.
async fn import_refuses_a_reversal_of_another_amount_or_instant(app: TestApp) {
    let at = (chrono::Utc::now() - chrono::Duration::days(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let later = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (_dir, file) = entries_csv(&format!(
        "\
         1,acme,api_requests,7,{at},,orig,,,\n\
         2,acme,api_requests,-5,{at},,part,reversal,1,\n\
         3,acme,api_requests,-7,{later},,moved,reversal,1,\n"
    ));
    let output = app.cli(&["import", file.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("1 created, 0 duplicate, 2 rejected"), "{stderr}");
    assert!(
        stderr.contains("line 3: reverses 1, but a reversal of it is acme api_requests -7"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 4: reverses 1, but a reversal of it is"),
        "{stderr}"
    );
    assert_eq!(app.count_entries().await, 1);
}

/// Creates a key with the CLI and returns (its plaintext, its id in `tally keys list`).
fn create_key_by_cli(app: &TestApp, name: &str) -> (String, i64) {
    let created = app.cli(&["keys", "create", "--role", "service", "--name", name]);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let key = text(&created.stdout).trim().to_owned();
    let listed = app.cli(&["keys", "list"]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    // A listing shows a key's first characters, never all of it.
    let prefix: String = key.chars().take(12).collect();
    let listing = text(&listed.stdout);
    let line = listing
        .lines()
        .find(|l| l.contains(&prefix))
        .unwrap_or_else(|| panic!("{prefix} is listed: {listing}"));
    let id = line.split_whitespace().next().unwrap().parse().unwrap();
    (key, id)
}

/// A name with a newline would split its row in two, so it is refused; long
/// account names and names with spaces widen their columns instead of pushing
/// the ones after them out of line.
async fn keys_list_keeps_its_columns_in_line_and_a_name_on_one_line(app: TestApp) {
    let refused = app.cli(&["keys", "create", "--role", "service", "--name", "two\nlines"]);
    assert!(!refused.status.success());
    let said = text(&refused.stderr);
    assert!(
        said.contains("cannot hold control characters") && said.contains("'\\n'"),
        "{said}"
    );
    assert!(app.store.list_api_keys().await.unwrap().is_empty(), "nothing stored");

    create_key_by_cli(&app, "ci");
    let long = app.cli(&[
        "keys",
        "create",
        "--role",
        "reader",
        "--account",
        "a-very-long-account-name-for-testing-purposes",
        "--name",
        "a name that is quite long, with spaces and more",
    ]);
    assert!(long.status.success(), "{}", text(&long.stderr));
    let listing = text(&app.cli(&["keys", "list"]).stdout);
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 3, "a header and a line a key: {listing}");
    let created = lines[0].find("created").unwrap();
    for line in &lines[1..] {
        let year = line.get(created..created + 4).unwrap_or_default();
        assert!(
            year.chars().all(|c| c.is_ascii_digit()) && year.len() == 4,
            "the created column starts at {created} on every line:\n{listing}"
        );
    }
    // A name stored by hand with a newline is shown escaped, on its line.
    let newline = match app.backend {
        Backend::Sqlite => "char(10)",
        Backend::Postgres => "chr(10)",
    };
    app.execute_raw(&format!(
        "UPDATE api_keys SET name = 'by' || {newline} || 'hand' WHERE name = 'ci'"
    ))
    .await
    .unwrap();
    let listing = text(&app.cli(&["keys", "list"]).stdout);
    assert_eq!(listing.lines().count(), 3, "{listing}");
    assert!(listing.contains("by\\nhand"), "{listing}");
}

async fn keys_revoke_makes_the_key_401_from_then_on(app: TestApp) {
    let (key, id) = create_key_by_cli(&app, "to-revoke");
    let (other, _) = create_key_by_cli(&app, "kept");
    let read = |key: String| {
        let app = &app;
        async move {
            app.request("GET", "/v1/accounts/acme/entries", Some(&key), None)
                .await
                .status
        }
    };
    assert_eq!(read(key.clone()).await, 200);
    let revoked = app.cli(&["keys", "revoke", &id.to_string()]);
    assert!(revoked.status.success(), "{}", text(&revoked.stderr));
    assert!(
        text(&revoked.stderr).contains(&format!("revoked key {id}")),
        "{}",
        text(&revoked.stderr)
    );
    let listing = text(&app.cli(&["keys", "list"]).stdout);
    let line = listing.lines().find(|l| l.contains("to-revoke")).unwrap();
    assert!(!line.trim_end().ends_with('-'), "the listing shows when: {line}");
    // The key was used just before: a server may trust it from its key cache
    // for up to KEY_CACHE_TTL, the documented delay of a revocation.
    tokio::time::sleep(tally::http::auth::KEY_CACHE_TTL + std::time::Duration::from_millis(100)).await;
    assert_eq!(read(key).await, 401);
    assert_eq!(read(other).await, 200, "only that key is revoked");
    // Again: nothing changes (the first time is kept), and it says so.
    let again = app.cli(&["keys", "revoke", &id.to_string()]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("was already revoked at"),
        "{}",
        text(&again.stderr)
    );
    let unknown = app.cli(&["keys", "revoke", "999999"]);
    assert!(!unknown.status.success(), "an unknown id is an error");
}

/// API.md: keys are stored hashed. Neither the plaintext nor its secret part
/// (past the prefix that listings show) is in any column of the keys table,
/// and what is stored is the key's hash.
async fn keys_are_stored_hashed_and_the_plaintext_is_nowhere_in_the_keys_table(app: TestApp) {
    let (key, id) = create_key_by_cli(&app, "hashed");
    let secret_part = &key[12..];
    assert!(secret_part.len() >= 32, "{key}");
    let rows = app.scalar_i64("SELECT COUNT(*) FROM api_keys").await;
    assert_eq!(rows, 1);
    let holding_it = app
        .scalar_i64(&format!(
            "SELECT COUNT(*) FROM api_keys WHERE COALESCE(name, '') LIKE '%{secret_part}%'
               OR role LIKE '%{secret_part}%' OR COALESCE(account, '') LIKE '%{secret_part}%'
               OR key_hash LIKE '%{secret_part}%' OR prefix LIKE '%{secret_part}%'"
        ))
        .await;
    assert_eq!(holding_it, 0, "the plaintext is not stored");
    let hash = tally::domain::KeySecret::from_presented(&key).hash();
    assert_eq!(
        app.scalar_i64(&format!(
            "SELECT COUNT(*) FROM api_keys WHERE id = {id} AND key_hash = '{hash}'"
        ))
        .await,
        1,
        "the stored form is the key's hash"
    );
}

/// Replicas, or a `tally post` beside `serve`, starting at once on a new
/// database: on SQLite all but one used to fail ("table entries already
/// exists", or "database is locked" while the file became WAL), and on both
/// engines each logged "created the schema" although one had.
async fn processes_migrating_a_new_database_at_once_all_start_and_one_creates_the_schema(app: TestApp) {
    for round in 0..3 {
        let Some((url, _dir)) = fresh_database(app.backend).await else {
            return;
        };
        let children: Vec<_> = (0..4)
            .map(|_| {
                Command::new(env!("CARGO_BIN_EXE_tally"))
                    .args(["migrate", "--database-url", &url])
                    .env("RUST_LOG", "info,sqlx=warn")
                    .stderr(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut created = 0;
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "round {round}: {}", text(&out.stderr));
            created += text(&out.stderr).matches("created the schema").count();
        }
        assert_eq!(created, 1, "round {round}: one process created the schema");
    }
}

async fn migrate_creates_the_schema_on_a_fresh_database_and_a_second_run_changes_nothing(app: TestApp) {
    // Not the test app's database: that one its app has migrated already.
    let Some((url, _dir)) = fresh_database(app.backend).await else {
        return;
    };
    let tables_sql = match app.backend {
        Backend::Sqlite => {
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'
             AND name IN ('entries', 'daily_totals', 'monthly_totals', 'api_keys', 'rollup_cursor')"
        }
        Backend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema()
             AND table_name IN ('entries', 'daily_totals', 'monthly_totals', 'api_keys', 'rollup_cursor')"
        }
    };
    match app.backend {
        Backend::Sqlite => {
            let file = url.strip_prefix("sqlite://").unwrap();
            assert!(!std::path::Path::new(file).exists(), "the file does not exist yet");
        }
        Backend::Postgres => assert_eq!(scalar_i64_at(app.backend, &url, tables_sql).await, 0),
    }
    let migrate = || {
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["migrate", "--database-url", &url])
            .env("RUST_LOG", "info,sqlx=warn")
            .output()
            .unwrap()
    };
    let first = migrate();
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert_eq!(scalar_i64_at(app.backend, &url, tables_sql).await, 5);
    if app.backend == Backend::Postgres {
        // Asking a new database which migrations it has applied must not put
        // an ERROR in the server's log. The log is the shared cluster's: no
        // test's first start may leave one.
        let log = tally::testing::pg_cluster::PgCluster::shared().unwrap().server_log();
        assert!(
            !log.contains(r#"relation "_sqlx_migrations" does not exist"#),
            "a first start left an ERROR in the server log"
        );
    }
    let engine = match app.backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let files = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(engine),
    )
    .unwrap()
    .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "sql"))
    .count();
    let applied_sql = "SELECT COUNT(*) FROM _sqlx_migrations WHERE success";
    assert_eq!(scalar_i64_at(app.backend, &url, applied_sql).await, files as i64);
    assert!(
        text(&first.stderr).contains(&format!("created the schema (migrations 0001 to {files:04})")),
        "{}",
        text(&first.stderr)
    );
    // When each migration was applied: a second run must leave them be.
    let installed_sql = match app.backend {
        Backend::Sqlite => {
            "SELECT CAST(SUM(CAST(strftime('%s', installed_on) AS INTEGER)) AS BIGINT) FROM _sqlx_migrations"
        }
        Backend::Postgres => {
            "SELECT CAST(SUM(EXTRACT(EPOCH FROM installed_on) * 1000000) AS BIGINT) FROM _sqlx_migrations"
        }
    };
    let installed = scalar_i64_at(app.backend, &url, installed_sql).await;

    let second = migrate();
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert!(
        !text(&second.stderr).contains("applied migration") && !text(&second.stderr).contains("created the schema"),
        "{}",
        text(&second.stderr)
    );
    assert_eq!(scalar_i64_at(app.backend, &url, applied_sql).await, files as i64);
    assert_eq!(
        scalar_i64_at(app.backend, &url, "SELECT COUNT(*) FROM _sqlx_migrations").await,
        files as i64,
        "no migration recorded twice"
    );
    assert_eq!(
        scalar_i64_at(app.backend, &url, installed_sql).await,
        installed,
        "nothing re-applied"
    );
    // An upgrade says which migrations it applied: a database from before
    // migration 0013 (its record and its work undone).
    let undo_0013 = match app.backend {
        Backend::Sqlite => "DELETE FROM _sqlx_migrations WHERE version = 13",
        Backend::Postgres => {
            "ALTER TABLE daily_totals DROP CONSTRAINT daily_totals_whole_minor_units;
             ALTER TABLE monthly_totals DROP CONSTRAINT monthly_totals_whole_minor_units;
             DELETE FROM _sqlx_migrations WHERE version = 13"
        }
    };
    match app.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            sqlx::raw_sql(undo_0013).execute(&pool).await.unwrap();
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            sqlx::raw_sql(undo_0013).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }
    let upgrade = migrate();
    assert!(upgrade.status.success(), "{}", text(&upgrade.stderr));
    assert!(
        text(&upgrade.stderr).contains("applied migration 0013 (totals hold whole minor units)"),
        "{}",
        text(&upgrade.stderr)
    );
    // The schema works: the CLI posts into it.
    let post = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["post", "acme", "api_requests", "3", "--database-url", &url])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(post.status.success(), "{}", text(&post.stderr));
}

/// `tally plans check` of `contents`, written to `file` first.
fn plans_check(file: &std::path::Path, contents: &str) -> std::process::Output {
    std::fs::write(file, contents).unwrap();
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["plans", "check", file.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn plans_check_reports_each_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plans.toml");
    let output = plans_check(
        &file,
        "default_plan = \"free\"\n\n[resources.api_requests]\ndecimals = 0\n\n[plans.free]\nprice = \"0\"\n\n[plans.free.limits.tokens]\nwindow = \"day\"\nlimit = \"10\"\n",
    );
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr
            .contains("plans.toml:9: plan 'free' limits resource 'tokens', which is not declared; known: api_requests"),
        "{stderr}"
    );

    let ok = plans_check(&file, include_str!("../../src/domain/builtin_catalog.toml"));
    assert!(ok.status.success(), "{}", text(&ok.stderr));
}

/// Bare integers are exact amounts, a float is refused with the string to
/// write instead, every problem comes in line order, and `default_plan`
/// offers only plans whose names are valid.
#[test]
fn plans_check_prints_problems_in_line_order_and_says_how_to_fix_each() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plans.toml");
    let output = plans_check(
        &file,
        "default_plan = \"gold\"\n\n[resources.llm_tokens]\n\n[plans.zeta]\nprice = 10\n\n[plans.zeta.limits.llm_tokens]\nwindow = \"day\"\nlimit = 50000\nenforcement = \"soft\"\noverage_price = 0.00002\n\n[plans.\"pro plus\"]\nprice = 9.99\n",
    );
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    let shown = file.display();
    assert_eq!(
        stderr,
        format!(
            "{shown}:1: default_plan 'gold' is not a plan of this catalog; set it to one of: zeta (or add a [plans.gold] table)\n\
             {shown}:12: plan 'zeta', resource 'llm_tokens': overage_price = 0.00002 is a TOML float, which is not exact (a binary float cannot hold most decimals); write it as a string: overage_price = \"0.00002\"\n\
             {shown}:14: plan name \"pro plus\" must be 1 to 64 characters of A-Za-z0-9_.-\n\
             {shown}:15: plan 'pro plus': price = 9.99 is a TOML float, which is not exact (a binary float cannot hold most decimals); write it as a string: price = \"9.99\"\n"
        )
    );

    let output = plans_check(
        &file,
        "default_plan = \"free\"\n[resources.x]\n[plans.free]\nprice = 0\n[plans.pro.v2]\nprice = 5\n",
    );
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(":5: [plans.pro.v2] is read by TOML as a table 'v2' inside plan 'pro'")
            && stderr.contains("write [plans.\"pro.v2\"]"),
        "{stderr}"
    );
}

/// A database that cannot be opened: the command says which, where the
/// setting comes from and what to check, and each cause once.
#[test]
fn a_database_that_cannot_be_opened_is_named_with_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/missing-folder/tally.db", dir.path().display());
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["--database-url", &url, "migrate"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("tally runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&url) && stderr.contains("folder must exist"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("unable to open database file").count(),
        1,
        "once: {stderr}"
    );
    assert!(!dir.path().join("missing-folder").exists(), "creates nothing");
}

/// A database in a folder the user cannot write: SQLite creates its -wal and
/// -shm files beside the file even to read, and the error says so. It used
/// to say only "attempt to write a readonly database", under advice that the
/// folder must exist. Root writes anywhere, so as root the command runs as
/// the `postgres` user (the one the PostgreSQL tests run the server as).
#[test]
fn on_sqlite_a_database_in_a_folder_it_cannot_write_says_sqlite_writes_beside_the_file() {
    use std::os::unix::fs::PermissionsExt as _;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tally.db");
    let url = format!("sqlite://{}", file.display());
    let created = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["--database-url", &url, "migrate"])
        .output()
        .expect("tally runs");
    assert!(created.status.success(), "{}", text(&created.stderr));
    assert!(
        !dir.path().join("tally.db-wal").exists(),
        "a clean stop removes the log"
    );
    let as_root = text(&Command::new("id").arg("-u").output().unwrap().stdout).trim() == "0";
    let mut command = if as_root {
        let has_user = Command::new("id")
            .arg("postgres")
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_user {
            assert!(
                std::env::var("TALLY_TEST_REQUIRE_POSTGRES").is_err(),
                "no `postgres` user to run as (install Debian's postgresql package)"
            );
            eprintln!("skipped: running as root, and no `postgres` user to run as");
            return;
        }
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--", env!("CARGO_BIN_EXE_tally")]);
        command
    } else {
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
        Command::new(env!("CARGO_BIN_EXE_tally"))
    };
    let output = command
        .args(["--database-url", &url, "verify"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("tally runs");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let stderr = text(&output.stderr);
    // 2: `verify` could not judge the totals.
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("SQLite cannot write {}", file.display()))
            && stderr.contains("-wal")
            && stderr.contains("folder must be writable"),
        "{stderr}"
    );
    assert!(!stderr.contains("folder must exist"), "{stderr}");
}

/// A command that reads what is there fails on a database that is not: on
/// SQLite a misspelt path (or the default `tally.db` in another working
/// directory) used to become a new, empty database, and `verify` passed and
/// exports came out empty on it. Commands that set things up still create one.
async fn reads_of_a_database_that_is_not_there_fail_and_create_nothing(app: TestApp) {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.db");
    let missing = match app.backend {
        Backend::Sqlite => format!("sqlite://{}", typo.display()),
        Backend::Postgres => {
            let (head, rest) = app.database_url.split_once("@localhost/").unwrap();
            let (_, query) = rest.split_once('?').unwrap();
            format!("{head}@localhost/tally_no_such_database?{query}")
        }
    };
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    for args in [
        &["verify"][..],
        &["rollup"],
        &["check", "acme", "api_requests"],
        &["usage", "acme"],
        &["accounts", "show", "acme"],
        &["stats", "--period", &month],
        &["export", "daily", "--from", "2026-11-01", "--to", "2026-12-01"],
        &["jobs", "run", "monthly-reports"],
        &["keys", "list"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .env("TALLY_DATABASE_URL", &missing)
            .env("TALLY_REPORTS_DIR", dir.path().join("reports"))
            // The built-in jobs: no jobs/ folder there.
            .env_remove("TALLY_JOBS")
            .current_dir(dir.path())
            .output()
            .unwrap();
        let said = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded: {}", text(&out.stdout));
        match app.backend {
            Backend::Sqlite => assert!(said.contains("there is no database at"), "{args:?}: {said}"),
            Backend::Postgres => assert!(said.contains("cannot open database"), "{args:?}: {said}"),
        }
        assert!(!typo.exists(), "{args:?} created {}", typo.display());
    }
    // Review AL: the commands that may create the database check their input
    // first, so refused input creates nothing either.
    let bad_header = dir.path().join("bad.csv");
    std::fs::write(&bad_header, "account,resource,amount,ocurred_at\n").unwrap();
    for (args, says) in [
        (
            &["accounts", "set-plan", "acme", "nope"][..],
            "plan 'nope' is not in the catalog",
        ),
        (
            &["accounts", "set-plan", "acme", "pro", "--effective-at", "2026-13-01"],
            "--effective-at",
        ),
        (
            &["accounts", "override", "acme", "nope", "--limit", "5"],
            "resource 'nope'",
        ),
        // On the command line no limit is `unlimited`, which is what it is told.
        (
            &["accounts", "override", "acme", "llm_tokens", "--limit", "null"],
            "(or unlimited for no limit)",
        ),
        (&["accounts", "clear-override", "acme", "llm_tokens"], ""),
        (&["post", "bad acct", "llm_tokens", "5"], "account"),
        (&["post", "acme", "nope", "5"], "resource 'nope'"),
        (&["import", "/nonexistent.csv"], "cannot open /nonexistent.csv"),
        (&["import", bad_header.to_str().unwrap()], "ocurred_at"),
        (&["keys", "create", "--role", "reader"], "pass --account ACCOUNT"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .env("TALLY_DATABASE_URL", &missing)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let said = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded: {}", text(&out.stdout));
        assert!(said.contains(says), "{args:?}: {said}");
        assert!(!said.contains("null /"), "{args:?}: {said}");
        assert!(!typo.exists(), "{args:?} created {}", typo.display());
    }
    if app.backend == Backend::Sqlite {
        let created = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["post", "acme", "api_requests", "1"])
            .env("TALLY_DATABASE_URL", &missing)
            .output()
            .unwrap();
        assert!(created.status.success(), "{}", text(&created.stderr));
        assert!(typo.exists(), "post creates the database");
        // `file:` names the file after it; a folder is said to be one.
        let tally_in_dir = |args: &[&str], url: &str| {
            Command::new(env!("CARGO_BIN_EXE_tally"))
                .args(args)
                .env("TALLY_DATABASE_URL", url)
                .current_dir(dir.path())
                .output()
                .unwrap()
        };
        let run = |url: &str| tally_in_dir(&["check", "acme", "api_requests"], url);
        let out = run("sqlite:file:typo.db");
        assert!(out.status.success(), "{}", text(&out.stderr));
        // Review BM: an in-memory database, however spelt, dies with the
        // command: `post` said "created entry 1" into nothing. Every command
        // but `serve` refuses one.
        for url in [
            "sqlite::memory:",
            "sqlite:file::memory:",
            "sqlite:?mode=memory",
            "sqlite:file:named?mode=memory",
            "sqlite://?mode=memory",
        ] {
            let out = run(url);
            // `check` keeps 1 for "over the limit": its errors exit 2.
            assert_eq!(out.status.code(), Some(2), "{url}: {}", text(&out.stdout));
            assert!(
                text(&out.stderr).contains("is an in-memory database, which lives only as long as the process"),
                "{url}: {}",
                text(&out.stderr)
            );
            let posted = Command::new(env!("CARGO_BIN_EXE_tally"))
                .args(["post", "acme", "api_requests", "1"])
                .env("TALLY_DATABASE_URL", url)
                .output()
                .unwrap();
            assert_eq!(posted.status.code(), Some(1), "{url}: {}", text(&posted.stdout));
            assert!(posted.stdout.is_empty(), "{url}: {}", text(&posted.stdout));
        }
        // Review BM: a URL naming no file made SQLite open a temporary
        // database per connection: "created the schema", then "no such
        // table". Said plainly, for reads and writes alike.
        for url in ["sqlite://", "sqlite:", "sqlite://?mode=rwc"] {
            for args in [&["migrate"][..], &["usage", "acme"]] {
                let out = tally_in_dir(args, url);
                let said = text(&out.stderr);
                assert_eq!(out.status.code(), Some(1), "{url} {args:?}: {said}");
                assert!(said.contains("names no file; give one"), "{url} {args:?}: {said}");
                assert!(!said.contains("created the schema"), "{url} {args:?}: {said}");
                assert!(!said.contains("PostgreSQL server"), "{url} {args:?}: {said}");
            }
        }
        // Review BN: spellings the URL check does not know are refused by
        // what SQLite opened; review BR: and, like a URL sqlx cannot read,
        // without the advice on folders and servers, which would mislead.
        for (url, says) in [
            ("sqlite:file:memdb-typo?vfs=memdb", "opens an in-memory database"),
            ("sqlite://typo.db?nonsense=1", "unknown query parameter `nonsense`"),
        ] {
            let out = tally_in_dir(&["migrate"], url);
            let said = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{url}: {said}");
            assert!(said.contains(says), "{url}: {said}");
            assert!(!said.contains("folder must exist"), "{url}: {said}");
        }
        // Nor is a lock file left for the in-memory one, which has no file.
        assert!(!dir.path().join("memdb-typo.tally-lock").exists());
        // A folder whose name merely contains `mode=memory` holds a file.
        let odd = dir.path().join("part=mode=memory");
        std::fs::create_dir(&odd).unwrap();
        let posted = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["post", "acme", "api_requests", "1"])
            .env("TALLY_DATABASE_URL", format!("sqlite://{}/t.db", odd.display()))
            .output()
            .unwrap();
        assert!(posted.status.success(), "{}", text(&posted.stderr));
        assert!(
            odd.join("t.db").exists(),
            "the file is created, not an in-memory database"
        );
        // The lock file beside a database is named after its path, not the URL.
        assert!(dir.path().join("typo.db.tally-lock").exists());
        assert!(!dir.path().join("file:typo.db.tally-lock").exists());
        let folder = run(&format!("sqlite://{}", dir.path().display()));
        assert!(!folder.status.success());
        assert!(text(&folder.stderr).contains("is a folder"), "{}", text(&folder.stderr));
    }
}

/// `RUST_LOG=tally=verbose` (no such level) once fell back to the default
/// filter without a word, so an operator waited for debug logs in vain.
async fn a_rust_log_that_does_not_parse_is_said_not_silently_replaced(app: TestApp) {
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["usage", "acme"])
        .env("TALLY_DATABASE_URL", &app.database_url)
        .env("RUST_LOG", "tally=verbose")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("RUST_LOG \"tally=verbose\" is not a log filter"),
        "{stderr}"
    );
}

/// The entries in a copy of the SQLite file `db` alone, without its `-wal`
/// and `-shm`: what a backup of only `tally.db` would hold.
async fn entries_in_a_copy_of_the_file_alone(db: &std::path::Path) -> i64 {
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(db, copy.path().join("copy.db")).unwrap();
    scalar_i64_at(
        Backend::Sqlite,
        &format!("sqlite://{}", copy.path().join("copy.db").display()),
        "SELECT COUNT(*) FROM entries",
    )
    .await
}

/// A clean exit (a command's end, `serve` after SIGTERM) leaves every commit
/// in `tally.db` itself, its write-ahead log empty or gone: before, the last
/// commits stayed in `tally.db-wal`, and a copy of `tally.db` alone lost them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_cleanly_stopped_process_leaves_every_commit_in_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tally.db");
    let url = format!("sqlite://{}", db.display());
    let wal = dir.path().join("tally.db-wal");
    let wal_is_empty = || std::fs::metadata(&wal).map_or(true, |m| m.len() == 0);

    let posted = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["post", "acme", "api_requests", "1", "--key", "by-cli"])
        .env("TALLY_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(posted.status.success(), "{}", text(&posted.stderr));
    assert!(
        wal_is_empty(),
        "the command left {} bytes of WAL",
        std::fs::metadata(&wal).unwrap().len()
    );
    assert_eq!(entries_in_a_copy_of_the_file_alone(&db).await, 1);

    let mut serve = crate::helpers::ServeProcess::start(&url, &["--no-jobs"], &[("TALLY_ADMIN_KEY", "k")]).await;
    let reply = reqwest::Client::new()
        .post(format!("{}/v1/entries", serve.address()))
        .bearer_auth("k")
        .json(&json!({"account": "acme", "resource": "api_requests", "amount": "2", "idempotency_key": "by-http"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let status = serve.stop().await;
    assert!(status.success(), "{}", serve.stderr());
    assert!(
        wal_is_empty(),
        "serve left {} bytes of WAL",
        std::fs::metadata(&wal).unwrap().len()
    );
    assert_eq!(entries_in_a_copy_of_the_file_alone(&db).await, 2);
}

/// Another process holding a read transaction (a `.backup`, a long export)
/// keeps the last commits in the WAL, and a command says so; it once waited
/// the busy timeout for the reader to finish, so every command, reads too,
/// took 10 s longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_reader_in_another_process_does_not_hold_up_a_command_at_its_end() {
    use sqlx::Connection as _;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tally.db");
    let url = format!("sqlite://{}", db.display());
    let tally = |args: &[&str]| {
        let started = std::time::Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .env("TALLY_DATABASE_URL", &url)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", text(&output.stderr));
        (started.elapsed(), text(&output.stderr))
    };
    tally(&["post", "acme", "api_requests", "1", "--key", "first"]);
    let mut reader = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut reader).await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM entries")
        .fetch_one(&mut reader)
        .await
        .unwrap();
    assert_eq!(seen, 1);
    for args in [
        &["post", "acme", "api_requests", "2", "--key", "second"][..],
        &["usage", "acme"][..],
    ] {
        let (took, stderr) = tally(args);
        assert!(
            took < std::time::Duration::from_secs(4),
            "{args:?} took {took:?}: {stderr}"
        );
        if args[0] == "post" {
            assert!(stderr.contains("another process reads the database"), "{stderr}");
        }
    }
    sqlx::query("COMMIT").execute(&mut reader).await.unwrap();
    reader.close().await.unwrap();
}

/// clap names the flag a refused value belongs to; when the value came from
/// the environment (a systemd unit, a cron line) the error says so, or the
/// reader looks for a flag nobody typed.
#[test]
fn a_refused_value_from_the_environment_names_its_variable() {
    let serve = |args: &[&str], listen: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tally"));
        command.arg("serve").args(args).env_remove("TALLY_LISTEN");
        if let Some(listen) = listen {
            command.env("TALLY_LISTEN", listen);
        }
        command.output().unwrap()
    };
    let from_environment = serve(&[], Some("7600"));
    assert_eq!(from_environment.status.code(), Some(2));
    let said = text(&from_environment.stderr);
    assert!(said.contains("\"7600\" has no host"), "{said}");
    assert!(
        said.contains("note: that value came from the environment variable TALLY_LISTEN, not from the command line"),
        "{said}"
    );
    // Typed on the command line (it wins over the variable): no such note.
    for listen in [None, Some("127.0.0.1:7600")] {
        let typed = serve(&["--listen", "7600"], listen);
        assert_eq!(typed.status.code(), Some(2));
        let said = text(&typed.stderr);
        assert!(said.contains("\"7600\" has no host"), "{said}");
        assert!(!said.contains("environment variable"), "{said}");
    }
}

/// Review AX: with stderr a closed pipe (`tally … 2>&1 | head -c 100`), a
/// command's error message panicked on the write and the command exited 101
/// instead of its own code.
#[test]
fn a_command_whose_stderr_is_a_closed_pipe_exits_with_its_own_code() {
    let folder = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().expect("a pipe");
    // The read end is gone before the command starts: every write to its
    // stderr fails.
    drop(reader);
    let status = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["usage", "acme"])
        .env(
            "TALLY_DATABASE_URL",
            format!("sqlite://{}/missing/tally.db", folder.path().display()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(writer)
        .status()
        .expect("tally runs");
    assert_eq!(status.code(), Some(1), "{status:?}");
}
