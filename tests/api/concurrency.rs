//! Exactly once under concurrency: retries racing each other land once.

use serde_json::json;

use crate::both;
use crate::helpers::{TestApp, entry};

both!(thirty_two_concurrent_clients_posting_the_same_1000_keys_land_exactly_1000_rows);

async fn thirty_two_concurrent_clients_posting_the_same_1000_keys_land_exactly_1000_rows(app: TestApp) {
    let app = std::sync::Arc::new(app);
    let keys: Vec<String> = (0..1000).map(|i| format!("key-{i:04}")).collect();
    let mut clients = Vec::new();
    for client in 0..32usize {
        let app = app.clone();
        // Each client sends the keys in its own rotation and batch size, so
        // batches overlap in every way (and would deadlock if locks were taken
        // in request order).
        let mut order = keys.clone();
        order.rotate_left(client * 37 % 1000);
        if client % 2 == 1 {
            order.reverse();
        }
        let batch_size = 50 + client * 7;
        clients.push(tokio::spawn(async move {
            let mut created = 0;
            for chunk in order.chunks(batch_size) {
                let batch: Vec<_> = chunk
                    .iter()
                    .map(|k| entry(&format!("acct-{}", &k[4..6]), "api_requests", "1", k))
                    .collect();
                let reply = app.post_entries(json!({ "entries": batch })).await;
                assert_eq!(reply.status, 200, "client {client}: {:?}", reply.body);
                let created_here = reply.body["created"].as_u64().unwrap();
                let duplicates = reply.body["duplicates"].as_u64().unwrap();
                assert_eq!(created_here + duplicates, chunk.len() as u64);
                created += created_here;
            }
            created
        }));
    }
    let mut created_total = 0;
    for client in clients {
        created_total += client.await.unwrap();
    }
    assert_eq!(created_total, 1000, "each key is created by exactly one client");
    assert_eq!(app.count_entries().await, 1000);
    assert_eq!(
        app.scalar_i64("SELECT COUNT(DISTINCT idempotency_key) FROM entries")
            .await,
        1000
    );
}
