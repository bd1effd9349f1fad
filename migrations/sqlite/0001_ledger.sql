-- The ledger: append-only, signed amounts.
--
-- Why integers: an amount is stored as a count of the resource's minor unit
-- (the catalog's `decimals`). SQLite's SUM over INTEGER is exact and raises
-- "integer overflow" instead of wrapping, while SUM over REAL/NUMERIC/TEXT
-- would go through floating point (DESIGN.md, invariant 6).
-- Why microsecond integers for time: they compare and bucket exactly and
-- index compactly; both engines keep microseconds.
CREATE TABLE entries (
    -- AUTOINCREMENT: ids are never reused, and SQLite's single writer makes
    -- id order commit order, which the rollup cursor relies on.
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    account         TEXT    NOT NULL,
    resource        TEXT    NOT NULL,
    amount          INTEGER NOT NULL CHECK (amount <> 0),
    occurred_at     INTEGER NOT NULL, -- µs since 1970-01-01T00:00:00Z
    recorded_at     INTEGER NOT NULL, -- µs since 1970-01-01T00:00:00Z
    idempotency_key TEXT    NOT NULL,
    source          TEXT,
    metadata        TEXT CHECK (metadata IS NULL OR json_type(metadata) = 'object'),
    reverses        INTEGER REFERENCES entries (id)
) STRICT;

-- Exactly once: a retried post finds its first row here.
CREATE UNIQUE INDEX entries_idempotency ON entries (account, idempotency_key);
-- An entry is reversed at most once.
CREATE UNIQUE INDEX entries_reverses ON entries (reverses) WHERE reverses IS NOT NULL;
-- Listing an account's rows in id order (keyset pagination).
CREATE INDEX entries_account_id ON entries (account, id);

-- Append-only, enforced by the database itself so that neither a bug nor a
-- hand-typed statement can rewrite history. Corrections are new entries.
CREATE TRIGGER entries_refuse_update BEFORE UPDATE ON entries
BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only: entries cannot be updated; post a correcting entry or a reversal');
END;

CREATE TRIGGER entries_refuse_delete BEFORE DELETE ON entries
BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only: entries cannot be deleted; post a correcting entry or a reversal');
END;

-- API keys, stored as SHA-256 hashes of the plaintext.
CREATE TABLE api_keys (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT,
    role       TEXT    NOT NULL CHECK (role IN ('admin', 'service', 'reader')),
    account    TEXT,
    key_hash   TEXT    NOT NULL UNIQUE,
    prefix     TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
) STRICT;
