//! TLS to PostgreSQL: sqlx is built with rustls, so `sslmode=require` and
//! `verify-full` work (they failed with "SQLx was built without TLS support
//! enabled", and the default `prefer` went plaintext without a word).

use std::sync::Arc;

use sqlx::Connection as _;
use tally::testing::pg_cluster::PgCluster;

/// Whether the connection `conn` is on goes over TLS, as the server sees it.
async fn over_tls(conn: &mut sqlx::PgConnection) -> bool {
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_sslmode_require_connects_over_tls_and_verify_full_checks_the_certificate() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
    let Some(cluster) = crate::helpers::own_pg_cluster_from(|| {
        PgCluster::start_with_tls(&certified.cert.pem(), &certified.key_pair.serialize_pem())
    }) else {
        return;
    };
    let url = cluster.tcp_url("postgres");

    let migrated = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("migrate")
        .env("TALLY_DATABASE_URL", format!("{url}?sslmode=require"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("tally runs");
    let stderr = String::from_utf8_lossy(&migrated.stderr);
    assert!(migrated.status.success(), "{stderr}");

    // Tally's own connections, as the store opens them.
    let catalog = Arc::new(tally::domain::Catalog::builtin());
    let store = tally::store::postgres::PgStore::connect(&format!("{url}?sslmode=require"), catalog.clone())
        .await
        .expect("the store opens over TLS");
    assert!(over_tls(&mut store.pool().acquire().await.unwrap()).await);

    // verify-full against the test's own certificate: the chain and the host
    // name are checked.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.crt");
    std::fs::write(&root, certified.cert.pem()).unwrap();
    let verified = format!("{url}?sslmode=verify-full&sslrootcert={}", root.display());
    let mut conn = sqlx::PgConnection::connect(&verified)
        .await
        .expect("verify-full with the right root");
    assert!(over_tls(&mut conn).await);
    conn.close().await.ok();
    // Without it, a self-signed certificate is refused (webpki's roots only).
    let refused = sqlx::PgConnection::connect(&format!("{url}?sslmode=verify-full")).await;
    assert!(refused.is_err(), "a self-signed certificate passed verify-full");

    // `prefer`, sqlx's default, now takes TLS where the server offers it.
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    assert!(over_tls(&mut conn).await);
    conn.close().await.ok();

    // A server that offers no TLS (the shared cluster, on a Unix socket):
    // `require` is refused in those words, no longer "SQLx was built without
    // TLS support enabled".
    let Some((plain, _)) = crate::helpers::fresh_database(crate::helpers::Backend::Postgres).await else {
        return;
    };
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("migrate")
        .env("TALLY_DATABASE_URL", format!("{plain}&sslmode=require"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("tally runs");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("server does not support TLS"), "{stderr}");
}
