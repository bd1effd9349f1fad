-- Every override as it was set or removed, so that a report as of an instant
-- (`tally export invoice --as-of T`) reads the overrides in force then, as it
-- reads only the plan assignments and entries recorded by then. The store
-- appends a row in the same transaction as each change; account_overrides
-- stays the current state that check and consume read.
CREATE TABLE account_override_history (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    account      TEXT    NOT NULL,
    resource     TEXT    NOT NULL,
    limit_amount INTEGER,
    enforcement  TEXT,
    limit_window TEXT,
    expires_at   INTEGER, -- µs since the epoch
    -- When the change was made (the override's updated_at, or the removal's time).
    changed_at   INTEGER NOT NULL,
    removed      INTEGER NOT NULL CHECK (removed IN (0, 1))
) STRICT;
CREATE INDEX account_override_history_by_key ON account_override_history (account, resource, changed_at);

-- Overrides set before this migration, as of when they were last set.
INSERT INTO account_override_history
    (account, resource, limit_amount, enforcement, limit_window, expires_at, changed_at, removed)
SELECT account, resource, limit_amount, enforcement, limit_window, expires_at, updated_at, 0
  FROM account_overrides;
