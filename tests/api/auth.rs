//! Keys and roles: 401 without a known key, 403 without the role or account.

use serde_json::json;
use tally::domain::Role;

use crate::both;
use crate::helpers::{ServeProcess, TestApp, entry};

both!(
    a_request_without_a_key_is_401,
    an_unknown_key_is_401,
    two_authorization_headers_are_401,
    a_service_key_posts_and_reads_any_account,
    a_reader_key_reads_only_its_own_account_and_cannot_post,
    a_service_key_bound_to_an_account_cannot_post_for_another,
    a_service_key_bound_to_an_account_cannot_read_another,
    a_revoked_key_is_401,
    a_key_revoked_after_use_is_refused_once_the_key_cache_expires,
    the_role_and_the_account_are_checked_before_the_body,
    a_key_bound_to_one_account_cannot_tell_another_accounts_entries_from_missing_ones,
    serve_on_a_database_without_keys_prints_one_admin_key_once_and_it_works,
    serve_with_tally_admin_key_creates_no_bootstrap_key,
    replicas_starting_at_once_on_a_database_without_keys_create_one_admin_key,
    a_bootstrap_key_that_cannot_be_shown_is_revoked_and_serve_stops,
    a_bootstrap_key_lost_to_a_closed_stderr_pipe_is_a_failure_not_a_quiet_stop,
    a_bootstrap_key_that_cannot_be_shown_among_log_lines_that_cannot_be_written_is_revoked,
    a_bootstrap_key_that_would_be_shown_to_dev_null_is_revoked,
    the_bearer_scheme_is_read_whatever_its_case,
);

async fn a_request_without_a_key_is_401(app: TestApp) {
    let reply = app
        .request(
            "POST",
            "/v1/entries",
            None,
            Some(entry("acme", "api_requests", "1", "k").to_string()),
        )
        .await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.code(), "unauthorized");
    assert!(reply.body["error"]["message"].as_str().unwrap().contains("Bearer"));
    assert_eq!(reply.headers["www-authenticate"], "Bearer", "RFC 7235 names the scheme");
    assert_eq!(app.count_entries().await, 0);
    let list = app.request("GET", "/v1/accounts/acme/entries", None, None).await;
    assert_eq!(list.status, 401);
}

/// Two Authorization headers: which key counts would be a guess, so neither
/// does (even when one of them is a good key).
async fn two_authorization_headers_are_401(app: TestApp) {
    let key = app.key(Role::Service, None).await;
    let response = app
        .client
        .get(format!("{}/v1/accounts/acme/usage", app.address))
        .header("Authorization", format!("Bearer {key}"))
        .header("Authorization", "Bearer tly_other")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than one Authorization header"),
        "{body}"
    );
}

async fn an_unknown_key_is_401(app: TestApp) {
    let reply = app
        .request(
            "POST",
            "/v1/entries",
            Some("tly_nope"),
            Some(entry("acme", "api_requests", "1", "k").to_string()),
        )
        .await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.headers["www-authenticate"], "Bearer");
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("tally keys create"),
        "says where keys come from: {message}"
    );
    assert_eq!(app.count_entries().await, 0);
}

async fn a_service_key_posts_and_reads_any_account(app: TestApp) {
    let key = app.key(Role::Service, None).await;
    let body = entry("acme", "api_requests", "1", "k").to_string();
    assert_eq!(
        app.request("POST", "/v1/entries", Some(&key), Some(body)).await.status,
        200
    );
    assert_eq!(
        app.request("GET", "/v1/accounts/acme/entries", Some(&key), None)
            .await
            .status,
        200
    );
    assert_eq!(
        app.request("GET", "/v1/accounts/other/entries", Some(&key), None)
            .await
            .status,
        200
    );
}

async fn a_reader_key_reads_only_its_own_account_and_cannot_post(app: TestApp) {
    let key = app.key(Role::Reader, Some("acme")).await;
    assert_eq!(
        app.request("GET", "/v1/accounts/acme/entries", Some(&key), None)
            .await
            .status,
        200
    );
    let other = app
        .request("GET", "/v1/accounts/globex/entries", Some(&key), None)
        .await;
    assert_eq!(other.status, 403);
    assert_eq!(other.code(), "forbidden");
    let post = app
        .request(
            "POST",
            "/v1/entries",
            Some(&key),
            Some(entry("acme", "api_requests", "1", "k").to_string()),
        )
        .await;
    assert_eq!(post.status, 403);
    let reversal = app
        .request(
            "POST",
            "/v1/entries/1/reversal",
            Some(&key),
            Some(json!({"idempotency_key": "r"}).to_string()),
        )
        .await;
    assert_eq!(reversal.status, 403);
    assert_eq!(app.count_entries().await, 0);
}

async fn a_service_key_bound_to_an_account_cannot_post_for_another(app: TestApp) {
    let key = app.key(Role::Service, Some("acme")).await;
    let body = json!({"entries": [entry("acme", "api_requests", "1", "a"), entry("globex", "api_requests", "1", "b")]});
    let reply = app
        .request("POST", "/v1/entries", Some(&key), Some(body.to_string()))
        .await;
    assert_eq!(reply.status, 403);
    assert_eq!(app.count_entries().await, 0);
    // Nothing is said about another account's entries, not even that one
    // names an unknown resource: the account is checked first.
    let body = json!({"entries": [entry("globex", "nope", "1", "c")]});
    let reply = app
        .request("POST", "/v1/entries", Some(&key), Some(body.to_string()))
        .await;
    assert_eq!((reply.status, reply.code()), (403, "forbidden"), "{:?}", reply.body);
}

/// Review BF: a service key bound to an account reads that account only,
/// as it writes to it only; "service reads any account" is for unbound keys.
async fn a_service_key_bound_to_an_account_cannot_read_another(app: TestApp) {
    let key = app.key(Role::Service, Some("acme")).await;
    for path in ["/v1/accounts/acme/entries", "/v1/accounts/acme/usage"] {
        let own = app.request("GET", path, Some(&key), None).await;
        assert_eq!(own.status, 200, "{path}: {:?}", own.body);
    }
    for path in ["/v1/accounts/globex/entries", "/v1/accounts/globex/usage"] {
        let other = app.request("GET", path, Some(&key), None).await;
        assert_eq!(
            (other.status, other.code()),
            (403, "forbidden"),
            "{path}: {:?}",
            other.body
        );
    }
}

/// RFC 7235: the scheme name is case-insensitive.
async fn the_bearer_scheme_is_read_whatever_its_case(app: TestApp) {
    for scheme in ["Bearer", "bearer", "BEARER", "Bearer\t"] {
        let header = if scheme.ends_with('\t') {
            format!("{scheme}{}", app.admin_key)
        } else {
            format!("{scheme} {}", app.admin_key)
        };
        let reply = app
            .client
            .get(format!("{}/v1/accounts/acme/entries", app.address))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200, "{scheme:?}");
    }
    let basic = app
        .client
        .get(format!("{}/v1/accounts/acme/entries", app.address))
        .header("authorization", format!("Basic {}", app.admin_key))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);
}

async fn a_revoked_key_is_401(app: TestApp) {
    let key = app.key(Role::Service, None).await;
    let id = app.store.list_api_keys().await.unwrap().last().unwrap().id;
    app.store.revoke_api_key(id).await.unwrap();
    let reply = app.request("GET", "/v1/accounts/acme/entries", Some(&key), None).await;
    assert_eq!(reply.status, 401);
}

async fn a_key_revoked_after_use_is_refused_once_the_key_cache_expires(app: TestApp) {
    let key = app.key(Role::Service, None).await;
    let reply = app.request("GET", "/v1/accounts/acme/entries", Some(&key), None).await;
    assert_eq!(reply.status, 200);
    let id = app.store.list_api_keys().await.unwrap().last().unwrap().id;
    app.store.revoke_api_key(id).await.unwrap();
    tokio::time::sleep(tally::http::auth::KEY_CACHE_TTL + std::time::Duration::from_millis(100)).await;
    let reply = app.request("GET", "/v1/accounts/acme/entries", Some(&key), None).await;
    assert_eq!(reply.status, 401);
}

/// A key without the role or the account gets 403 whatever its body holds:
/// the body is read only for a caller allowed to send it.
async fn the_role_and_the_account_are_checked_before_the_body(app: TestApp) {
    let reader = app.key(Role::Reader, Some("acme")).await;
    for (method, path) in [
        ("PUT", "/v1/accounts/acme/plan"),
        ("PUT", "/v1/accounts/acme/overrides/llm_tokens"),
        ("POST", "/v1/quota/check"),
        ("POST", "/v1/entries/1/reversal"),
    ] {
        let reply = app
            .request(method, path, Some(&reader), Some("{\"broken\": ".into()))
            .await;
        assert_eq!(reply.status, 403, "{method} {path}: {:?}", reply.body);
        assert_eq!(reply.code(), "forbidden");
    }
    // Refused from the headers: the request announces a body and sends none,
    // so an app that read the body first would wait for it.
    let service = app.key(Role::Service, None).await;
    for (key, method, path) in [
        (&reader, "POST", "/v1/entries"),
        (&reader, "POST", "/v1/quota/consume"),
        (&service, "PUT", "/v1/accounts/acme/plan"),
    ] {
        let head = app
            .answer_to_head(method, path, key, "Content-Length: 1048576\r\n")
            .await;
        assert!(head.starts_with("HTTP/1.1 403"), "{method} {path}: {head}");
        assert!(head.contains(&format!("cannot {method} {path}")), "{head}");
    }

    let bound = app.key(Role::Service, Some("acme")).await;
    let invalid_for_another =
        json!({"account": "globex", "resource": "llm_tokens", "amount": "0", "idempotency_key": "k"});
    let reply = app
        .request(
            "POST",
            "/v1/quota/consume",
            Some(&bound),
            Some(invalid_for_another.to_string()),
        )
        .await;
    assert_eq!(reply.status, 403, "{:?}", reply.body);
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("globex")),
        "{:?}",
        reply.body
    );
    assert_eq!(app.count_entries().await, 0);
}

/// Reversal names an entry by id only; a key bound to another account must
/// not learn that the id exists, nor whose it is.
async fn a_key_bound_to_one_account_cannot_tell_another_accounts_entries_from_missing_ones(app: TestApp) {
    let posted = app.post_entries(entry("globex", "api_requests", "5", "g1")).await;
    let id = posted.body["entries"][0]["id"].as_i64().unwrap();
    let bound = app.key(Role::Service, Some("acme")).await;
    let body = json!({"idempotency_key": "undo"}).to_string();
    let others = app
        .request(
            "POST",
            &format!("/v1/entries/{id}/reversal"),
            Some(&bound),
            Some(body.clone()),
        )
        .await;
    let missing_id = id + 1000;
    let missing = app
        .request(
            "POST",
            &format!("/v1/entries/{missing_id}/reversal"),
            Some(&bound),
            Some(body),
        )
        .await;
    assert_eq!(others.status, 404, "{:?}", others.body);
    assert_eq!(others.code(), "not_found");
    assert!(!others.body.to_string().contains("globex"), "{:?}", others.body);
    assert_eq!(
        others.body["error"]["message"],
        missing.body["error"]["message"]
            .as_str()
            .unwrap()
            .replace(&(id + 1000).to_string(), &id.to_string())
    );
    assert_eq!(app.count_entries().await, 1, "nothing reversed");
}

/// The status of GET /v1/admin/stats (admin only) on the server at `address`.
async fn admin_stats_status(app: &TestApp, address: &str, key: &str) -> u16 {
    app.client
        .get(format!("{address}/v1/admin/stats?period=2026-09"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// `TALLY_ADMIN_KEY` is an admin key, so a database without stored keys does
/// not have "no key at all": `serve` creates none and prints none.
async fn serve_with_tally_admin_key_creates_no_bootstrap_key(app: TestApp) {
    let mut serve = ServeProcess::start(&app.database_url, &["--no-jobs"], &[("TALLY_ADMIN_KEY", "env-admin")]).await;
    let stderr = serve.stderr();
    assert!(!stderr.contains("shown once"), "{stderr}");
    assert!(!stderr.lines().any(|l| l.trim().starts_with("tly_")), "{stderr}");
    assert_eq!(admin_stats_status(&app, &serve.address(), "env-admin").await, 200);
    assert!(serve.stop().await.success(), "{}", serve.stderr());
    assert_eq!(app.scalar_i64("SELECT COUNT(*) FROM api_keys").await, 0);
}

/// API.md: "creates one admin key", also when several replicas start at
/// once on a database without keys (each used to find none and make its own,
/// printed in its own log).
async fn replicas_starting_at_once_on_a_database_without_keys_create_one_admin_key(app: TestApp) {
    let replicas =
        futures_util::future::join_all((0..4).map(|_| ServeProcess::start(&app.database_url, &["--no-jobs"], &[])))
            .await;
    let printed = replicas
        .iter()
        .filter(|r| r.stderr().lines().any(|l| l.trim().starts_with("tly_")))
        .count();
    assert_eq!(app.scalar_i64("SELECT COUNT(*) FROM api_keys").await, 1);
    assert_eq!(printed, 1, "one replica prints the one key");
    for mut replica in replicas {
        assert!(replica.stop().await.success(), "{}", replica.stderr());
    }
}

/// Review BB: the bootstrap key is shown once, on stderr; when that write
/// failed (a full disk under the log) it was ignored, leaving a valid admin
/// key nobody had seen. Now the key is revoked and serve stops, saying so.
async fn a_bootstrap_key_that_cannot_be_shown_is_revoked_and_serve_stops(app: TestApp) {
    // Every write to /dev/full fails with "No space left on device".
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    assert_serve_revokes_the_bootstrap_key_it_cannot_show(&app, full.into(), "error").await;
    // Review BC: the revoked key counts as a key, so no bootstrap key comes
    // again; the next start says that nobody can administer it.
    let mut serve = ServeProcess::start(&app.database_url, &["--no-jobs"], &[]).await;
    let warned = serve
        .wait_for_stderr(
            "no admin key is valid in this database",
            std::time::Duration::from_secs(5),
        )
        .await;
    assert!(warned.is_some_and(|line| line.contains("WARN")), "{}", serve.stderr());
    assert!(serve.stop().await.success(), "{}", serve.stderr());
}

/// Review BC: a write to a pipe nobody reads fails with "broken pipe", which
/// the command line takes for `tally export … | head` and ends quietly with
/// status 0: a serve that revoked its unseen key and stopped looked to a
/// process manager like a clean stop.
async fn a_bootstrap_key_lost_to_a_closed_stderr_pipe_is_a_failure_not_a_quiet_stop(app: TestApp) {
    // A pipe whose read end is closed at once.
    assert_serve_revokes_the_bootstrap_key_it_cannot_show(&app, std::process::Stdio::piped(), "error").await;
}

/// Review BQ: with the log lines before the key on, the first of them, which
/// a full disk refused, made `serve` panic before it created the key, and
/// the next start on a disk with room created one: the key is now revoked
/// as when it is the first write.
async fn a_bootstrap_key_that_cannot_be_shown_among_log_lines_that_cannot_be_written_is_revoked(app: TestApp) {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    assert_serve_revokes_the_bootstrap_key_it_cannot_show(&app, full.into(), "debug").await;
}

/// Review BQ: with stderr closed (`serve 2>&-`), the runtime reopens it on
/// /dev/null, which takes every write: the key was "shown" there and kept,
/// valid, unseen. /dev/null is now refused as a failed write is.
async fn a_bootstrap_key_that_would_be_shown_to_dev_null_is_revoked(app: TestApp) {
    assert_serve_revokes_the_bootstrap_key_it_cannot_show(&app, std::process::Stdio::null(), "error").await;
}

/// Starts `serve` on `app`'s database, which holds no key, with its stderr
/// on `stderr` (a pipe is closed at once), where the bootstrap key cannot be
/// written, and logs filtered by `rust_log`; asserts that serve fails and
/// that the one key it made is revoked.
async fn assert_serve_revokes_the_bootstrap_key_it_cannot_show(
    app: &TestApp,
    stderr: std::process::Stdio,
    rust_log: &str,
) {
    assert_eq!(app.scalar_i64("SELECT COUNT(*) FROM api_keys").await, 0);
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--listen", "127.0.0.1:0", "--no-jobs"])
        .env("TALLY_DATABASE_URL", &app.database_url)
        .env_remove("TALLY_ADMIN_KEY")
        // At `error`, nothing is logged before the key, the first write.
        .env("RUST_LOG", rust_log)
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("tally serve starts");
    drop(serve.stderr.take());
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), serve.wait())
        .await
        .expect("serve stops when it cannot show the key")
        .unwrap();
    assert!(!status.success(), "{status:?}");
    assert_eq!(app.scalar_i64("SELECT COUNT(*) FROM api_keys").await, 1);
    assert_eq!(
        app.scalar_i64("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL")
            .await,
        0,
        "the key nobody saw is revoked"
    );
}

/// API.md: `serve` on a database with no key at all creates one admin key and
/// prints it once on stderr. The test app's own admin key lives in its
/// settings, not in the database, so the database starts with none.
async fn serve_on_a_database_without_keys_prints_one_admin_key_once_and_it_works(app: TestApp) {
    assert_eq!(app.scalar_i64("SELECT COUNT(*) FROM api_keys").await, 0);
    let printed_keys = |stderr: &str| -> Vec<String> {
        stderr
            .lines()
            .filter(|l| l.trim().starts_with("tly_"))
            .map(|l| l.trim().to_owned())
            .collect()
    };
    // A blank TALLY_ADMIN_KEY is no key (one of spaces can never be sent).
    let mut first = ServeProcess::start(&app.database_url, &["--no-jobs"], &[("TALLY_ADMIN_KEY", "   ")]).await;
    let stderr = first.stderr();
    let keys = printed_keys(&stderr);
    assert_eq!(keys.len(), 1, "one key, printed once: {stderr}");
    assert!(stderr.contains("shown once"), "{stderr}");
    let key = &keys[0];
    // An admin-only read: the key is an admin key.
    assert_eq!(admin_stats_status(&app, &first.address(), key).await, 200);
    assert_eq!(admin_stats_status(&app, &first.address(), "tly_not_it").await, 401);
    assert!(first.stop().await.success(), "{}", first.stderr());

    let mut second = ServeProcess::start(&app.database_url, &["--no-jobs"], &[]).await;
    let stderr = second.stderr();
    assert_eq!(printed_keys(&stderr), Vec::<String>::new(), "{stderr}");
    assert!(!stderr.contains("shown once"), "{stderr}");
    assert_eq!(
        admin_stats_status(&app, &second.address(), key).await,
        200,
        "the key was kept"
    );
    assert!(second.stop().await.success(), "{}", second.stderr());
    assert_eq!(
        app.scalar_i64("SELECT COUNT(*) FROM api_keys WHERE role = 'admin'")
            .await,
        1
    );
    assert_eq!(app.scalar_i64("SELECT COUNT(*) FROM api_keys").await, 1);
}
