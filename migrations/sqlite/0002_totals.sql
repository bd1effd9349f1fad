-- Daily and monthly totals per (account, resource, bucket), folded from the
-- ledger by the rollup. Amounts in minor units, like the ledger (INTEGER:
-- exact sums that raise on overflow). Buckets are UTC dates as 'YYYY-MM-DD'
-- text (fixed width, so text order is date order); a month is its first day.
CREATE TABLE daily_totals (
    account  TEXT    NOT NULL,
    resource TEXT    NOT NULL,
    day      TEXT    NOT NULL,
    amount   INTEGER NOT NULL,
    entries  INTEGER NOT NULL,
    PRIMARY KEY (account, resource, day)
) STRICT, WITHOUT ROWID;

CREATE TABLE monthly_totals (
    account  TEXT    NOT NULL,
    resource TEXT    NOT NULL,
    month    TEXT    NOT NULL,
    amount   INTEGER NOT NULL,
    entries  INTEGER NOT NULL,
    PRIMARY KEY (account, resource, month)
) STRICT, WITHOUT ROWID;

-- Where the rollup stands. It moves in the same transaction as the totals it
-- wrote, so a crash leaves both before or both after a batch (exactly once).
-- On SQLite id order is commit order (one writer, AUTOINCREMENT).
CREATE TABLE rollup_cursor (
    name       TEXT    PRIMARY KEY,
    last_id    INTEGER NOT NULL,
    updated_at INTEGER NOT NULL  -- µs since the epoch
) STRICT;

INSERT INTO rollup_cursor (name, last_id, updated_at) VALUES ('rollup', 0, 0);
