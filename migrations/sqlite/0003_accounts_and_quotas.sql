-- Plan assignments, kept as history: the plan in force at an instant is the
-- latest assignment effective at or before it. An account with none is on the
-- catalog's default plan.
CREATE TABLE account_plans (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    account      TEXT    NOT NULL,
    plan         TEXT    NOT NULL,
    effective_at INTEGER NOT NULL, -- µs since the epoch
    created_at   INTEGER NOT NULL
) STRICT;
CREATE INDEX account_plans_by_account ON account_plans (account, effective_at);

-- Per-account limits that beat the plan's until they expire. limit_amount in
-- the resource's minor unit; NULL means unlimited.
CREATE TABLE account_overrides (
    account      TEXT    NOT NULL,
    resource     TEXT    NOT NULL,
    limit_amount INTEGER,
    enforcement  TEXT    CHECK (enforcement IN ('hard', 'soft')),
    limit_window TEXT    CHECK (limit_window IN ('day', 'month', 'total')),
    expires_at   INTEGER,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (account, resource)
) STRICT;

-- What a successful consume answered, so a retry with the same idempotency key
-- returns the first outcome (and records nothing new).
CREATE TABLE consume_outcomes (
    entry_id INTEGER PRIMARY KEY REFERENCES entries (id),
    response TEXT    NOT NULL
) STRICT;
