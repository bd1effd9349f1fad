//! Error messages say what went wrong and what to do next (review D6, D7):
//! each test pins the part of a message that once misled or left the
//! client without a next step.

use serde_json::{Value, json};

use crate::both;
use crate::helpers::{TestApp, days_ago_at};

both!(a_reused_consume_key_names_each_field_that_differs_and_both_values,);

fn message(reply: &crate::helpers::Reply) -> String {
    reply.body["error"]["message"].as_str().unwrap_or_default().to_owned()
}

fn consume(account: &str, resource: &str, amount: Value, key: &str) -> Value {
    json!({"account": account, "resource": resource, "amount": amount, "idempotency_key": key})
}

async fn a_reused_consume_key_names_each_field_that_differs_and_both_values(app: TestApp) {
    let at = days_ago_at(1, "10:00:00");
    let mut first = consume("acme", "api_requests", json!("3"), "k1");
    first["occurred_at"] = json!(at);
    let recorded = app.post("/v1/quota/consume", first.clone()).await;
    assert_eq!(recorded.status, 200, "{:?}", recorded.body);
    let id = recorded.body["entry_id"].as_i64().unwrap();

    let mut other_amount = first.clone();
    other_amount["amount"] = json!("4");
    let reply = app.post("/v1/quota/consume", other_amount).await;
    assert_eq!(
        (reply.status, reply.code()),
        (409, "idempotency_conflict"),
        "{:?}",
        reply.body
    );
    assert_eq!(
        message(&reply),
        format!(
            "idempotency_key 'k1' of account 'acme' was already used by entry {id}, which differs in amount (3 \
             there, 4 here); the same key must carry the same usage, so use a new key for new usage (a retry \
             resends the first content)"
        )
    );

    let mut two_fields = first.clone();
    two_fields["resource"] = json!("llm_tokens");
    two_fields["occurred_at"] = json!(days_ago_at(1, "11:30:00"));
    let reply = app.post("/v1/quota/consume", two_fields).await;
    assert_eq!(reply.status, 409, "{:?}", reply.body);
    let text = message(&reply);
    assert!(
        text.contains(&format!(
            "which differs in resource ('api_requests' there, 'llm_tokens' here) and occurred_at ({at} there, {} \
             here);",
            days_ago_at(1, "11:30:00")
        )),
        "{text}"
    );
    assert!(!text.contains("amount"), "{text}");
    assert!(!text.contains("reverse"), "{text}");
    // Without occurred_at, a retry matches whatever instant was recorded.
    let mut no_instant = first.clone();
    no_instant.as_object_mut().unwrap().remove("occurred_at");
    assert_eq!(app.post("/v1/quota/consume", no_instant).await.status, 200);
    assert_eq!(app.count_entries().await, 1);
}
