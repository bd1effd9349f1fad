-- Daily and monthly totals per (account, resource, bucket), folded from the
-- ledger by the rollup. Amounts in minor units, like the ledger (BIGINT: exact
-- sums that raise on overflow). Buckets are UTC dates; a month is its first day.
CREATE TABLE daily_totals (
    account  TEXT   NOT NULL,
    resource TEXT   NOT NULL,
    day      DATE   NOT NULL,
    amount   BIGINT NOT NULL,
    entries  BIGINT NOT NULL,
    PRIMARY KEY (account, resource, day)
);

CREATE TABLE monthly_totals (
    account  TEXT   NOT NULL,
    resource TEXT   NOT NULL,
    month    DATE   NOT NULL CHECK (extract(day FROM month) = 1),
    amount   BIGINT NOT NULL,
    entries  BIGINT NOT NULL,
    PRIMARY KEY (account, resource, month)
);

-- Where the rollup stands: the last (tx_id, id) folded. Rows are folded in
-- (tx_id, id) order and only once their transaction is below the snapshot's
-- xmin, i.e. finished: an id is taken at insert, not at commit, so a cursor on
-- id alone would skip a row that commits late (DESIGN.md, invariant 3).
-- The cursor moves in the same transaction as the totals it wrote.
CREATE TABLE rollup_cursor (
    name       TEXT        PRIMARY KEY,
    last_tx    XID8        NOT NULL,
    last_id    BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

INSERT INTO rollup_cursor (name, last_tx, last_id, updated_at) VALUES ('rollup', '0', 0, 'epoch');
