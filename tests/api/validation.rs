//! Bad input gets a clear error in the contract's format and writes nothing.

use chrono::{Duration, SecondsFormat, Utc};
use serde_json::{Value, json};

use crate::both;
use crate::helpers::{Reply, TestApp, entry, entry_at};

both!(
    malformed_json_is_400,
    a_method_a_route_does_not_take_is_405_with_the_error_body,
    a_body_with_both_one_entry_and_entries_is_400,
    a_body_that_is_an_array_is_400_on_every_route_that_takes_one,
    a_batch_over_10000_entries_is_413,
    a_batch_of_exactly_10000_entries_is_accepted,
    a_body_over_10_mib_is_413,
    a_body_of_exactly_10_mib_is_read_and_one_byte_more_is_413,
    a_body_announced_over_10_mib_is_413_before_it_is_sent,
    a_body_far_over_10_mib_sent_without_waiting_still_reads_its_413,
    an_empty_batch_is_422,
    an_unknown_resource_is_422_naming_the_known_ones,
    a_zero_amount_is_422,
    too_many_fractional_digits_is_422,
    an_after_id_past_64_bits_is_422_out_of_range,
    an_amount_of_10_to_the_15_is_422,
    an_amount_that_is_not_a_number_is_422,
    an_amount_that_would_need_rounding_is_422_never_rounded,
    a_leap_second_is_422_wherever_an_instant_is_written,
    field_names_written_with_json_escapes_are_read_in_a_single_entry,
    an_account_with_bad_characters_is_422,
    an_account_over_128_characters_is_422,
    an_idempotency_key_over_255_characters_is_422,
    an_idempotency_key_of_exactly_255_characters_is_accepted,
    a_missing_idempotency_key_is_422,
    metadata_over_4_kib_is_422,
    metadata_of_exactly_4_kib_is_accepted,
    metadata_that_is_not_an_object_is_422,
    text_holding_the_nul_character_is_422_on_every_write,
    occurred_at_more_than_5_minutes_ahead_is_in_future,
    occurred_at_older_than_the_horizon_is_too_late,
    the_horizon_refuses_from_the_first_second_past_it_not_from_the_next_day,
    occurred_at_that_is_not_rfc3339_is_422,
    one_bad_entry_fails_the_whole_batch_with_its_index,
    reversing_an_entry_older_than_the_horizon_is_too_late_for_a_service,
    a_retry_after_the_entry_passed_the_horizon_is_answered_as_a_retry,
    an_admin_key_bound_to_an_account_is_refused,
    a_path_that_is_not_utf_8_is_422_in_the_contract_format,
);

/// Posts `body` and checks the 422 names `field` (at `index`) and wrote nothing.
async fn assert_rejected(app: &TestApp, body: Value, code: &str, index: usize, field: &str) -> Reply {
    let reply = app.post_entries(body).await;
    assert_eq!(reply.status, 422, "{:?}", reply.body);
    assert_eq!(reply.code(), code, "{:?}", reply.body);
    let errors = reply.body["error"]["details"]["errors"]
        .as_array()
        .expect("details.errors");
    assert!(
        errors.iter().any(|e| e["index"] == index
            && e["field"] == field
            && e["message"].as_str().is_some_and(|m| !m.is_empty())),
        "expected an error on entries[{index}].{field}: {errors:?}"
    );
    assert_eq!(app.count_entries().await, 0, "a rejected request writes nothing");
    reply
}

fn with(field: &str, value: Value) -> Value {
    let mut body = entry("acme", "api_requests", "1", "k1");
    body[field] = value;
    body
}

async fn malformed_json_is_400(app: TestApp) {
    let reply = app
        .request(
            "POST",
            "/v1/entries",
            Some(&app.admin_key),
            Some("{\"account\": ".into()),
        )
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.code(), "malformed_body");
    let wrong_type = app.post_entries(with("account", json!(17))).await;
    assert_eq!(wrong_type.status, 400, "{:?}", wrong_type.body);
    let typo = app
        .post_entries(with("ocurred_at", json!("2026-11-01T00:00:00Z")))
        .await;
    assert_eq!(typo.status, 400);
    assert!(typo.body["error"]["message"].as_str().unwrap().contains("ocurred_at"));
    // In a batch: the entry at fault, and the position in the whole body (it
    // was counted from the list's `[`).
    let good = entry("acme", "api_requests", "1", "k1").to_string();
    for (body, says) in [
        (
            "{\"entries\":[1]}".to_owned(),
            "entries[0]: invalid type: integer `1`, expected an entry object at line 1 column 13",
        ),
        (
            format!("{{\"entries\": [{good}, {{\"acount\": \"x\"}}]}}"),
            "entries[1]: unknown field `acount`",
        ),
        ("{\"entries\": 5}".to_owned(), "at line 1 column 13"),
        // Twice, either way round: refused, not the last list posted.
        (
            format!("{{\"entries\": [1], \"entries\": [{good}]}}"),
            "names \"entries\" twice",
        ),
        (
            format!("{{\"entries\": [{good}], \"entries\": [1]}}"),
            "names \"entries\" twice",
        ),
    ] {
        let reply = app
            .request("POST", "/v1/entries", Some(&app.admin_key), Some(body.clone()))
            .await;
        assert_eq!((reply.status, reply.code()), (400, "malformed_body"), "{body}");
        let message = reply.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    // Review AP: a compressed body is named as such, not as "not a JSON
    // object" (its bytes are not decoded), even when what it holds is JSON.
    let gzipped = app
        .client
        .post(format!("{}/v1/entries", app.address))
        .bearer_auth(&app.admin_key)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(gzipped.status(), 400);
    let said: Value = gzipped.json().await.unwrap();
    assert_eq!(said["error"]["code"], "malformed_body");
    assert!(
        said["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Content-Encoding \"gzip\", which Tally does not decode; send the JSON uncompressed"),
        "{said}"
    );
    assert_eq!(app.count_entries().await, 0);
}

async fn a_method_a_route_does_not_take_is_405_with_the_error_body(app: TestApp) {
    let reply = app
        .request("GET", "/v1/quota/consume", Some(&app.admin_key), None)
        .await;
    assert_eq!(reply.status, 405, "{:?}", reply.body);
    assert_eq!(reply.code(), "method_not_allowed", "{:?}", reply.body);
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("GET") && m.contains("/v1/quota/consume")),
        "{:?}",
        reply.body
    );
    let allow = reply.headers.get("allow").and_then(|v| v.to_str().ok());
    assert_eq!(allow, Some("POST"), "{:?}", reply.headers);
}

async fn a_body_with_both_one_entry_and_entries_is_400(app: TestApp) {
    let mut body = entry("acme", "api_requests", "1", "k1");
    body["entries"] = json!([entry("acme", "api_requests", "1", "k2")]);
    let reply = app.post_entries(body).await;
    assert_eq!(reply.status, 400);
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("[\"account\", \"amount\", \"idempotency_key\", \"resource\"]"),
        "names the other fields: {message}"
    );
    let stray = app
        .post_entries(json!({"entries": [entry("acme", "api_requests", "1", "k3")], "foo": 1}))
        .await;
    assert_eq!(stray.status, 400);
    assert!(
        stray.body["error"]["message"].as_str().unwrap().contains("[\"foo\"]"),
        "{:?}",
        stray.body
    );
    let not_an_object = app.post_entries(json!({"entries": [1]})).await;
    assert_eq!(not_an_object.status, 400);
    let message = not_an_object.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("expected an entry object"),
        "no Rust type names: {message}"
    );
    assert_eq!(app.count_entries().await, 0);
}

/// serde reads a struct from an array of its fields in declaration order;
/// the contract's bodies are objects, so an array is refused, not decoded.
async fn a_body_that_is_an_array_is_400_on_every_route_that_takes_one(app: TestApp) {
    for (method, path, body) in [
        (
            "POST",
            "/v1/quota/consume",
            json!(["acme", "llm_tokens", 1, "q1", null, null, null]),
        ),
        ("POST", "/v1/quota/check", json!(["acme", "llm_tokens", null, null])),
        ("PUT", "/v1/accounts/acme/plan", json!(["pro", null])),
        (
            "PUT",
            "/v1/accounts/acme/overrides/llm_tokens",
            json!(["5", null, null, null]),
        ),
        ("POST", "/v1/entries", json!([entry("acme", "api_requests", "1", "k1")])),
        // A batch body as an array of its one field, and entries as arrays
        // of theirs: serde's derive reads both unless told otherwise.
        (
            "POST",
            "/v1/entries",
            json!([[entry("acme", "api_requests", "1", "k1")]]),
        ),
        (
            "POST",
            "/v1/entries",
            json!({"entries": [["acme", "api_requests", "1", "k1", null, null, null]]}),
        ),
        ("POST", "/v1/entries/1/reversal", json!(["undo", null])),
    ] {
        let reply = app
            .request(method, path, Some(&app.admin_key), Some(body.to_string()))
            .await;
        assert_eq!(reply.status, 400, "{method} {path}: {:?}", reply.body);
        assert_eq!(reply.code(), "malformed_body", "{method} {path}");
    }
    assert_eq!(app.count_entries().await, 0);
    let account = app.get("/v1/accounts/acme").await;
    assert_eq!(account.status, 200, "{:?}", account.body);
    assert_eq!(account.body["plan"], "free", "no plan set: {:?}", account.body);
    assert_eq!(
        account.body["overrides"],
        json!([]),
        "no override set: {:?}",
        account.body
    );
}

async fn a_batch_over_10000_entries_is_413(app: TestApp) {
    let batch: Vec<_> = (0..10_001)
        .map(|i| entry("acme", "api_requests", "1", &format!("k{i}")))
        .collect();
    let reply = app.post_entries(json!({ "entries": batch })).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.code(), "payload_too_large");
    assert_eq!(app.count_entries().await, 0);
}

/// Review BF: 1 to 10 000 entries is the contract; a count checked after
/// the push refused the 10 000th.
async fn a_batch_of_exactly_10000_entries_is_accepted(app: TestApp) {
    let batch: Vec<_> = (0..10_000)
        .map(|i| entry("acme", "api_requests", "1", &format!("k{i}")))
        .collect();
    let reply = app.post_entries(json!({ "entries": batch })).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        reply.text.chars().take(300).collect::<String>()
    );
    assert_eq!(reply.body["created"], 10_000);
    assert_eq!(app.count_entries().await, 10_000);
}

async fn a_body_over_10_mib_is_413(app: TestApp) {
    let mut body = entry("acme", "api_requests", "1", "k1");
    body["source"] = json!("x".repeat(11 * 1024 * 1024));
    let reply = app.post_entries(body).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.code(), "payload_too_large");
    assert_eq!(app.count_entries().await, 0);
}

/// Review BF: a body *over* 10 MiB is 413; one of exactly 10 MiB is read
/// (a `>=` refused it).
async fn a_body_of_exactly_10_mib_is_read_and_one_byte_more_is_413(app: TestApp) {
    const LIMIT: usize = 10 * 1024 * 1024;
    let entry = entry("acme", "api_requests", "1", "k1").to_string();
    let padded = |len: usize| format!("{entry}{}", " ".repeat(len - entry.len()));
    let over = app
        .request("POST", "/v1/entries", Some(&app.admin_key), Some(padded(LIMIT + 1)))
        .await;
    assert_eq!(
        (over.status, over.code()),
        (413, "payload_too_large"),
        "{:?}",
        over.body
    );
    let at_limit = app
        .request("POST", "/v1/entries", Some(&app.admin_key), Some(padded(LIMIT)))
        .await;
    assert_eq!(at_limit.status, 200, "{:?}", at_limit.body);
    assert_eq!(app.count_entries().await, 1);
}

/// A client that announces too large a body (curl does, with `Expect:
/// 100-continue`, for anything over 1 MiB) hears 413 from the head alone,
/// instead of being told to go on and uploading 10 MiB to be refused.
async fn a_body_announced_over_10_mib_is_413_before_it_is_sent(app: TestApp) {
    let key = app.admin_key.clone();
    for path in ["/v1/entries", "/v1/quota/consume"] {
        let head = app
            .answer_to_head(
                "POST",
                path,
                &key,
                "Content-Length: 20971520\r\nExpect: 100-continue\r\n",
            )
            .await;
        assert!(head.starts_with("HTTP/1.1 413"), "{path}: {head}");
        assert!(!head.contains("100 Continue"), "{path}: {head}");
        assert!(head.contains("payload_too_large"), "{path}: {head}");
    }
    assert_eq!(app.count_entries().await, 0);
}

/// A client that sends its whole body at once (no `Expect: 100-continue`)
/// is still writing when the limit is reached: the rest is read and dropped
/// before the 413, so the client reads the answer instead of a broken pipe
/// (closing on 10 MiB unread reset the connection).
async fn a_body_far_over_10_mib_sent_without_waiting_still_reads_its_413(app: TestApp) {
    let mut body = entry("acme", "api_requests", "1", "k1");
    body["source"] = json!("x".repeat(20 * 1024 * 1024));
    for _ in 0..3 {
        let reply = app.post_entries(body.clone()).await;
        assert_eq!(reply.status, 413);
        assert_eq!(reply.code(), "payload_too_large");
    }
    assert_eq!(app.count_entries().await, 0);
}

async fn an_empty_batch_is_422(app: TestApp) {
    let reply = app.post_entries(json!({ "entries": [] })).await;
    assert_eq!(reply.status, 422);
    assert_eq!(app.count_entries().await, 0);
}

async fn an_unknown_resource_is_422_naming_the_known_ones(app: TestApp) {
    let reply = assert_rejected(
        &app,
        with("resource", json!("tokens")),
        "unknown_resource",
        0,
        "resource",
    )
    .await;
    assert_eq!(
        reply.body["error"]["message"],
        "resource 'tokens' is not in the catalog; known: agent_minutes, ai_generations, api_requests, llm_tokens, storage_bytes"
    );
    // Every problem at once: an amount wrong for any resource is reported
    // beside the unknown resource; one only the resource could judge is not.
    for (amount, reported) in [("0", true), ("abc", true), ("1e15", true), ("1.5", false)] {
        let mut body = with("resource", json!("tokens"));
        body["amount"] = json!(amount);
        let reply = app.post_entries(body).await;
        assert_eq!(reply.status, 422);
        let fields: Vec<&str> = reply.body["error"]["details"]["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields.contains(&"amount"), reported, "{amount}: {fields:?}");
    }
}

async fn a_zero_amount_is_422(app: TestApp) {
    assert_rejected(&app, with("amount", json!("0")), "validation_failed", 0, "amount").await;
    assert_rejected(&app, with("amount", json!(0)), "validation_failed", 0, "amount").await;
}

async fn too_many_fractional_digits_is_422(app: TestApp) {
    assert_rejected(&app, with("amount", json!("1.5")), "validation_failed", 0, "amount").await;
    // Trailing zeros do not count, and the message says what does: "0.10"
    // was said to have 1 fractional digit, where the client wrote two.
    let reply = assert_rejected(&app, with("amount", json!("0.10")), "validation_failed", 0, "amount").await;
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("0.10 has 1 significant fractional digit (trailing zeros aside)"),
        "{message}"
    );
    let mut minutes = entry("acme", "agent_minutes", "1.255", "k1");
    let reply = assert_rejected(&app, minutes.clone(), "validation_failed", 0, "amount").await;
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'agent_minutes' takes 2")
    );
    minutes["amount"] = json!("1.25");
    assert_eq!(app.post_entries(minutes).await.status, 200);
    let mut whole = entry("acme", "api_requests", "2.000", "k2");
    assert_eq!(app.post_entries(whole.clone()).await.status, 200);
    whole["amount"] = json!("2");
    let again = app.post_entries(whole).await;
    assert_eq!(
        again.body["entries"][0]["status"], "duplicate",
        "the same amount: {:?}",
        again.body
    );
}

/// An `after_id` past 64 bits is called out of range, not "not an integer".
async fn an_after_id_past_64_bits_is_422_out_of_range(app: TestApp) {
    let reply = app.get("/v1/accounts/acme/entries?after_id=99999999999999999999").await;
    assert_eq!(reply.status, 422, "{:?}", reply.body);
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("is out of range (ids are 64-bit integers)"),
        "{message}"
    );
    let reply = app.get("/v1/accounts/acme/entries?after_id=ten").await;
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("\"ten\" is not an integer"), "{message}");
}

async fn an_amount_of_10_to_the_15_is_422(app: TestApp) {
    assert_rejected(
        &app,
        with("amount", json!("1000000000000000")),
        "validation_failed",
        0,
        "amount",
    )
    .await;
    assert_rejected(
        &app,
        with("amount", json!(-1_000_000_000_000_000i64)),
        "validation_failed",
        0,
        "amount",
    )
    .await;
}

async fn an_amount_that_is_not_a_number_is_422(app: TestApp) {
    assert_rejected(&app, with("amount", json!("twelve")), "validation_failed", 0, "amount").await;
    assert_rejected(&app, with("amount", json!(true)), "validation_failed", 0, "amount").await;
}

/// Scientific notation is parsed exactly: more digits than an exact decimal
/// holds are refused, never rounded to a nearby amount (this one to 3).
async fn an_amount_that_would_need_rounding_is_422_never_rounded(app: TestApp) {
    assert_rejected(
        &app,
        with("amount", json!("2.9999999999999999999999999999999e0")),
        "validation_failed",
        0,
        "amount",
    )
    .await;
    // The same as a JSON number, sent as written (json! would round it).
    let raw = r#"{"account": "acme", "resource": "api_requests", "amount": 1.00000000000000000000000000001e0, "idempotency_key": "k1"}"#;
    let reply = app
        .request("POST", "/v1/entries", Some(&app.admin_key), Some(raw.into()))
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (422, "validation_failed"),
        "{:?}",
        reply.body
    );
    assert_eq!(app.count_entries().await, 0);
    // An exact spelling with many zeros is its value.
    let ten = app
        .post_entries(with("amount", json!("1.00000000000000000000000000000000e1")))
        .await;
    assert_eq!(ten.status, 200, "{:?}", ten.body);
    assert_eq!(app.ledger_sum("acme", "api_requests").await, 10);
}

/// A leap second would be stored as the next second (here, the next day)
/// while it was judged in its own day, and a retry would then conflict with
/// what was stored: refused wherever an instant is written or read.
async fn a_leap_second_is_422_wherever_an_instant_is_written(app: TestApp) {
    let leap = format!("{}T23:59:60Z", (Utc::now() - Duration::days(1)).format("%Y-%m-%d"));
    let reply = assert_rejected(
        &app,
        with("occurred_at", json!(leap)),
        "validation_failed",
        0,
        "occurred_at",
    )
    .await;
    assert!(reply.body.to_string().contains("leap second"), "{:?}", reply.body);
    let consume = app
        .post(
            "/v1/quota/consume",
            json!({"account": "acme", "resource": "llm_tokens", "amount": "1", "idempotency_key": "c", "occurred_at": leap}),
        )
        .await;
    assert_eq!(
        (consume.status, consume.code()),
        (422, "validation_failed"),
        "{:?}",
        consume.body
    );
    let check = app
        .post(
            "/v1/quota/check",
            json!({"account": "acme", "resource": "llm_tokens", "at": leap}),
        )
        .await;
    assert_eq!(check.status, 422, "{:?}", check.body);
    assert_eq!(
        check.body["error"]["details"]["errors"][0]["field"], "at",
        "{:?}",
        check.body
    );
    assert_eq!(app.count_entries().await, 0);
}

/// JSON allows any character of a name to be escaped; a single entry (not
/// only a batch) reads such names.
async fn field_names_written_with_json_escapes_are_read_in_a_single_entry(app: TestApp) {
    let raw = r#"{"acc\u006funt": "acme", "resource": "api_requests", "amount": "2", "idempotency_key": "k1"}"#;
    let reply = app
        .request("POST", "/v1/entries", Some(&app.admin_key), Some(raw.into()))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(app.ledger_sum("acme", "api_requests").await, 2);
}

async fn an_account_with_bad_characters_is_422(app: TestApp) {
    assert_rejected(
        &app,
        with("account", json!("acme corp")),
        "validation_failed",
        0,
        "account",
    )
    .await;
    assert_rejected(
        &app,
        with("account", json!("acme/1")),
        "validation_failed",
        0,
        "account",
    )
    .await;
    assert_rejected(&app, with("account", json!("")), "validation_failed", 0, "account").await;
}

async fn an_account_over_128_characters_is_422(app: TestApp) {
    assert_rejected(
        &app,
        with("account", json!("a".repeat(129))),
        "validation_failed",
        0,
        "account",
    )
    .await;
}

async fn an_idempotency_key_over_255_characters_is_422(app: TestApp) {
    assert_rejected(
        &app,
        with("idempotency_key", json!("k".repeat(256))),
        "validation_failed",
        0,
        "idempotency_key",
    )
    .await;
}

/// Review BF: 255 characters is the limit, not one past it; counted in
/// characters, not bytes.
async fn an_idempotency_key_of_exactly_255_characters_is_accepted(app: TestApp) {
    for key in ["k".repeat(255), "\u{e9}".repeat(255)] {
        let reply = app.post_entries(with("idempotency_key", json!(key))).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(reply.body["entries"][0]["idempotency_key"], key.as_str());
    }
    assert_eq!(app.count_entries().await, 2);
}

async fn a_missing_idempotency_key_is_422(app: TestApp) {
    let mut body = entry("acme", "api_requests", "1", "k1");
    body.as_object_mut().unwrap().remove("idempotency_key");
    assert_rejected(&app, body, "validation_failed", 0, "idempotency_key").await;
}

async fn metadata_over_4_kib_is_422(app: TestApp) {
    assert_rejected(
        &app,
        with("metadata", json!({ "blob": "x".repeat(4100) })),
        "validation_failed",
        0,
        "metadata",
    )
    .await;
}

/// Review BF: "at most 4 KiB": metadata of exactly 4096 bytes as compact
/// JSON is taken (a `>=` refused it), 4097 is not.
async fn metadata_of_exactly_4_kib_is_accepted(app: TestApp) {
    // {"blob":"…"} is 11 bytes around the text.
    let of_len = |len: usize| json!({ "blob": "x".repeat(len - 11) });
    assert_eq!(of_len(4096).to_string().len(), 4096);
    assert_rejected(&app, with("metadata", of_len(4097)), "validation_failed", 0, "metadata").await;
    let reply = app.post_entries(with("metadata", of_len(4096))).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    // Review BN: measured as sent, not as stored: `1e19` is kept as
    // `10000000000000000000`, 16 bytes more, and 4096 bytes were refused.
    let mut with_a_float = json!({ "n": 1e19, "blob": "" });
    let around = with_a_float.to_string().len();
    with_a_float["blob"] = json!("x".repeat(4096 - around));
    assert_eq!(with_a_float.to_string().len(), 4096);
    let mut body = with("metadata", with_a_float);
    body["idempotency_key"] = json!("k2");
    let reply = app.post_entries(body).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
}

/// PostgreSQL cannot store U+0000 in text or JSON; both engines refuse it
/// up front instead of one of them failing with a 500.
async fn text_holding_the_nul_character_is_422_on_every_write(app: TestApp) {
    let reply = assert_rejected(
        &app,
        with("source", json!("gate\u{0}way")),
        "validation_failed",
        0,
        "source",
    )
    .await;
    assert!(
        reply.body["error"]["details"]["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("NUL")),
        "{:?}",
        reply.body
    );
    assert_rejected(
        &app,
        with("metadata", json!({"a\u{0}b": 1})),
        "validation_failed",
        0,
        "metadata",
    )
    .await;
    assert_rejected(
        &app,
        with("metadata", json!({"tags": [{"note": "x\u{0}"}]})),
        "validation_failed",
        0,
        "metadata",
    )
    .await;

    let consume = app
        .post(
            "/v1/quota/consume",
            json!({"account": "acme", "resource": "llm_tokens", "amount": "1", "idempotency_key": "c1",
                   "metadata": {"x": "\u{0}"}}),
        )
        .await;
    assert_eq!(consume.status, 422, "{:?}", consume.body);
    assert_eq!(consume.body["error"]["details"]["errors"][0]["field"], "metadata");
    assert_eq!(app.count_entries().await, 0, "a refused consume writes nothing");

    let posted = app.post_entries(entry("acme", "api_requests", "1", "k1")).await;
    let id = posted.body["entries"][0]["id"].as_i64().expect("the entry's id");
    let reversal = app
        .post(
            &format!("/v1/entries/{id}/reversal"),
            json!({"idempotency_key": "undo", "reason": "typo\u{0}"}),
        )
        .await;
    assert_eq!(reversal.status, 422, "{:?}", reversal.body);
    assert_eq!(reversal.body["error"]["details"]["errors"][0]["field"], "reason");
    assert_eq!(app.count_entries().await, 1, "a refused reversal writes nothing");
}

async fn metadata_that_is_not_an_object_is_422(app: TestApp) {
    assert_rejected(&app, with("metadata", json!(["a"])), "validation_failed", 0, "metadata").await;
    assert_rejected(
        &app,
        with("metadata", json!("text")),
        "validation_failed",
        0,
        "metadata",
    )
    .await;
}

async fn occurred_at_more_than_5_minutes_ahead_is_in_future(app: TestApp) {
    let ahead = (Utc::now() + Duration::minutes(6)).to_rfc3339_opts(SecondsFormat::Secs, true);
    assert_rejected(&app, with("occurred_at", json!(ahead)), "in_future", 0, "occurred_at").await;
    let slightly_ahead = (Utc::now() + Duration::minutes(4)).to_rfc3339_opts(SecondsFormat::Secs, true);
    assert_eq!(
        app.post_entries(with("occurred_at", json!(slightly_ahead)))
            .await
            .status,
        200
    );
}

async fn occurred_at_older_than_the_horizon_is_too_late(app: TestApp) {
    let old = (Utc::now() - Duration::days(36)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let reply = assert_rejected(&app, with("occurred_at", json!(old)), "too_late", 0, "occurred_at").await;
    assert!(reply.body["error"]["message"].as_str().unwrap().contains("35 days"));
    let recent = (Utc::now() - Duration::days(34)).to_rfc3339_opts(SecondsFormat::Secs, true);
    assert_eq!(app.post_entries(with("occurred_at", json!(recent))).await.status, 200);
}

/// Review BF: the horizon is an instant (now − 35 days), not a day: an
/// entry a second older than it is too late even on the same UTC day
/// (comparing dates let the whole of that day in).
async fn the_horizon_refuses_from_the_first_second_past_it_not_from_the_next_day(app: TestApp) {
    let noon = (Utc::now() - Duration::days(1))
        .date_naive()
        .and_hms_opt(12, 0, 0)
        .unwrap()
        .and_utc();
    app.clock.freeze_at(noon);
    let at = |t: chrono::DateTime<Utc>| json!(t.to_rfc3339_opts(SecondsFormat::Secs, true));
    let horizon = noon - Duration::days(35);
    let reply = assert_rejected(
        &app,
        with("occurred_at", at(horizon - Duration::seconds(1))),
        "too_late",
        0,
        "occurred_at",
    )
    .await;
    assert!(reply.body["error"]["message"].as_str().unwrap().contains("35 days"));
    let on_it = app.post_entries(with("occurred_at", at(horizon))).await;
    assert_eq!(on_it.status, 200, "{:?}", on_it.body);
    app.clock.thaw();
}

async fn occurred_at_that_is_not_rfc3339_is_422(app: TestApp) {
    assert_rejected(
        &app,
        with("occurred_at", json!("yesterday")),
        "validation_failed",
        0,
        "occurred_at",
    )
    .await;
    // Each common mistake is named, on every field and query parameter
    // that takes an instant.
    let no_offset = assert_rejected(
        &app,
        with("occurred_at", json!("2026-11-20T10:00:00")),
        "validation_failed",
        0,
        "occurred_at",
    )
    .await;
    let message = no_offset.body["error"]["details"]["errors"][0]["message"]
        .as_str()
        .unwrap();
    assert!(message.contains("has no UTC offset"), "{message}");
    let plan = app
        .put_admin(
            "/v1/accounts/acme/plan",
            json!({"plan": "pro", "effective_at": "2026-12-01"}),
        )
        .await;
    assert_eq!(plan.status, 422, "{:?}", plan.body);
    assert!(
        plan.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("a date without a time"),
        "{:?}",
        plan.body
    );
    let unencoded_plus = app
        .get("/v1/accounts/acme/entries?from=2026-11-15T12:00:00+01:00")
        .await;
    assert_eq!(unencoded_plus.status, 422, "{:?}", unencoded_plus.body);
    assert!(
        unencoded_plus.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("%2B"),
        "{:?}",
        unencoded_plus.body
    );
}

async fn one_bad_entry_fails_the_whole_batch_with_its_index(app: TestApp) {
    let body = json!({"entries": [
        entry("acme", "api_requests", "1", "a"),
        entry("acme", "api_requests", "1", "b"),
        entry("acme", "api_requests", "0", "c"),
    ]});
    let reply = assert_rejected(&app, body, "validation_failed", 2, "amount").await;
    // A batch of thousands is searched by its message too, so it names the entry.
    assert_eq!(
        reply.body["error"]["message"],
        "entry 2: amount must not be zero: an entry records a change (positive for use, negative for a correction or a deletion); leave out an entry that changes nothing",
        "{:?}",
        reply.body
    );
    let one = assert_rejected(
        &app,
        entry("acme", "api_requests", "0", "d"),
        "validation_failed",
        0,
        "amount",
    )
    .await;
    assert_eq!(
        one.body["error"]["message"],
        "amount must not be zero: an entry records a change (positive for use, negative for a correction or a deletion); leave out an entry that changes nothing",
        "one entry has no position to name"
    );
}

/// A reversal lands in its original's period, so the horizon that closes a
/// period to a service's new entries closes it to its reversals too; an
/// operator can still correct it, deliberately, with an admin key.
async fn reversing_an_entry_older_than_the_horizon_is_too_late_for_a_service(app: TestApp) {
    let old = (Utc::now() - Duration::days(40)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let id = app.insert(&[("acme", "api_requests", "7", "old", &old)]).await[0];
    let service = app.key(tally::domain::Role::Service, None).await;
    let body = json!({"idempotency_key": "undo"}).to_string();
    let path = format!("/v1/entries/{id}/reversal");
    let reply = app.request("POST", &path, Some(&service), Some(body.clone())).await;
    assert_eq!((reply.status, reply.code()), (422, "too_late"), "{:?}", reply.body);
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("35 days") && message.contains("admin key"),
        "{message}"
    );
    assert_eq!(reply.body["error"]["details"]["errors"][0]["field"], "id");
    assert_eq!(app.count_entries().await, 1, "a refused reversal writes nothing");
    let admin = app.request("POST", &path, Some(&app.admin_key), Some(body)).await;
    assert_eq!(admin.status, 200, "{:?}", admin.body);
    assert_eq!(admin.body["amount"], "-7");
}

/// Review AP: the horizon refuses new entries, not retries. A service that
/// retries a post, a consume or a reversal made while its entry was within
/// the horizon gets the answer of a retry (duplicate, first outcome,
/// conflict), not `too_late` for an entry the ledger holds.
async fn a_retry_after_the_entry_passed_the_horizon_is_answered_as_a_retry(app: TestApp) {
    let first = Utc::now();
    let old = (first - Duration::days(34)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let service = app.key(tally::domain::Role::Service, None).await;
    let send = |path: &'static str, body: Value| {
        let (app, service) = (&app, &service);
        async move { app.request("POST", path, Some(service), Some(body.to_string())).await }
    };
    let posted = entry_at("acme", "llm_tokens", "5", "p1", &old);
    let consumed = json!({"account": "acme", "resource": "llm_tokens", "amount": 1,
                          "idempotency_key": "c1", "occurred_at": old});
    app.clock.freeze_at(first);
    let post = send("/v1/entries", posted.clone()).await;
    assert_eq!(post.status, 200, "{:?}", post.body);
    let id = post.body["entries"][0]["id"].as_i64().unwrap();
    let consume = send("/v1/quota/consume", consumed.clone()).await;
    assert_eq!(consume.status, 200, "{:?}", consume.body);
    let reversal_path = format!("/v1/entries/{id}/reversal");
    let reversal_body = json!({"idempotency_key": "undo-p1"}).to_string();
    let reversed = app
        .request("POST", &reversal_path, Some(&service), Some(reversal_body.clone()))
        .await;
    assert_eq!(reversed.status, 200, "{:?}", reversed.body);
    let written = app.count_entries().await;

    // Two days on, all three are past the horizon.
    app.clock.freeze_at(first + Duration::days(2));
    let again = send("/v1/entries", posted.clone()).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body["entries"][0]["status"], "duplicate");
    assert_eq!(again.body["entries"][0]["id"], id);
    let replayed = send("/v1/quota/consume", consumed.clone()).await;
    assert_eq!(replayed.status, 200, "{:?}", replayed.body);
    assert_eq!(replayed.body["entry_id"], consume.body["entry_id"]);
    let reversed_again = app
        .request("POST", &reversal_path, Some(&service), Some(reversal_body))
        .await;
    assert_eq!(reversed_again.status, 200, "{:?}", reversed_again.body);
    assert_eq!(reversed_again.body["id"], reversed.body["id"]);
    assert_eq!(reversed_again.body["status"], "duplicate");
    // Other content under a recorded key is a conflict, as for any retry.
    let changed = send("/v1/entries", entry_at("acme", "llm_tokens", "6", "p1", &old)).await;
    assert_eq!(
        (changed.status, changed.code()),
        (409, "idempotency_conflict"),
        "{:?}",
        changed.body
    );
    // A new entry that old is still too late, and takes its batch with it;
    // the error names it alone, not the retry beside it.
    let batch = json!({"entries": [posted, entry_at("acme", "llm_tokens", "5", "p2", &old)]});
    let refused = send("/v1/entries", batch).await;
    assert_eq!(
        (refused.status, refused.code()),
        (422, "too_late"),
        "{:?}",
        refused.body
    );
    let errors = refused.body["error"]["details"]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["index"], 1);
    let new_consume = send(
        "/v1/quota/consume",
        json!({"account": "acme", "resource": "llm_tokens", "amount": 1,
               "idempotency_key": "c2", "occurred_at": old}),
    )
    .await;
    assert_eq!(
        (new_consume.status, new_consume.code()),
        (422, "too_late"),
        "{:?}",
        new_consume.body
    );
    let new_reversal = app
        .request(
            "POST",
            &format!("/v1/entries/{}/reversal", consume.body["entry_id"]),
            Some(&service),
            Some(json!({"idempotency_key": "undo-c1"}).to_string()),
        )
        .await;
    assert_eq!(
        (new_reversal.status, new_reversal.code()),
        (422, "too_late"),
        "{:?}",
        new_reversal.body
    );
    assert_eq!(app.count_entries().await, written, "retries and refusals write nothing");
    app.clock.thaw();
}

/// An admin key passes every account check, so binding one to an account
/// would only look like a limit: `keys create` refuses it.
async fn an_admin_key_bound_to_an_account_is_refused(app: TestApp) {
    let output = app.cli(&["keys", "create", "--role", "admin", "--account", "acme"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot be bound to 'acme'"), "{stderr}");
    assert!(output.stdout.is_empty(), "no key printed");
    assert_eq!(app.scalar_i64("SELECT COUNT(*) FROM api_keys").await, 0);
}

/// axum answers an unreadable path in plain text; ours is the error body.
async fn a_path_that_is_not_utf_8_is_422_in_the_contract_format(app: TestApp) {
    for path in [
        "/v1/accounts/%FF/usage",
        "/v1/accounts/%FF/features/git_export",
        "/v1/entries/%FF/reversal",
    ] {
        let method = if path.ends_with("reversal") { "POST" } else { "GET" };
        let body = (method == "POST").then(|| json!({"idempotency_key": "k"}).to_string());
        let reply = app.request(method, path, Some(&app.admin_key), body).await;
        assert_eq!(
            (reply.status, reply.code()),
            (422, "validation_failed"),
            "{path}: {:?}",
            reply.body
        );
        let message = reply.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("path"), "{message}");
    }
    // Review AP: so is a query parameter, which was decoded to '�' and
    // echoed; a '�' the client sent itself is its text.
    for path in [
        "/v1/accounts/acme/timeseries?resource=%FF&granularity=day&from=2026-11-01&to=2026-11-02",
        "/v1/accounts/acme/entries?limit=1&%FF=1",
    ] {
        let reply = app.get(path).await;
        assert_eq!(
            (reply.status, reply.code()),
            (422, "validation_failed"),
            "{path}: {:?}",
            reply.body
        );
        let message = reply.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("is not text: its percent-encoding (such as %FF) does not decode to UTF-8")
                && !message.contains('\u{FFFD}'),
            "{message}"
        );
        assert_eq!(reply.body["error"]["details"]["errors"][0]["field"], "query");
    }
    let sent = app
        .get("/v1/accounts/acme/timeseries?resource=%EF%BF%BD&granularity=day&from=2026-11-01&to=2026-11-02")
        .await;
    assert_eq!(sent.code(), "unknown_resource", "{:?}", sent.body);
}

both!(the_admin_top_limit_outside_1_to_1000_is_refused,);

/// `GET /v1/admin/top` takes `limit` from 1 to 1000: 0 and 1001 are refused
/// naming the parameter, not answered with an empty or oversized list.
async fn the_admin_top_limit_outside_1_to_1000_is_refused(app: TestApp) {
    for limit in ["0", "1001"] {
        let reply = app
            .get(&format!(
                "/v1/admin/top?resource=api_requests&period=2026-09&limit={limit}"
            ))
            .await;
        assert_eq!(
            (reply.status, reply.code()),
            (422, "validation_failed"),
            "limit={limit}: {:?}",
            reply.body
        );
        let error = &reply.body["error"]["details"]["errors"][0];
        assert_eq!(error["field"], "limit", "{:?}", reply.body);
        assert!(
            error["message"].as_str().unwrap().contains("from 1 to 1000"),
            "limit={limit}: {:?}",
            reply.body
        );
    }
    let ok = app
        .get("/v1/admin/top?resource=api_requests&period=2026-09&limit=1000")
        .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
}
