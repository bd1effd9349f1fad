-- The ledger: append-only, signed amounts.
--
-- Why BIGINT: an amount is stored as a count of the resource's minor unit
-- (the catalog's `decimals`), the same representation as on SQLite; sums are
-- exact, and SUM(bigint)::bigint raises on overflow instead of wrapping.
CREATE TABLE entries (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account         TEXT        NOT NULL,
    resource        TEXT        NOT NULL,
    amount          BIGINT      NOT NULL CHECK (amount <> 0),
    occurred_at     TIMESTAMPTZ NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL,
    idempotency_key TEXT        NOT NULL,
    source          TEXT,
    metadata        JSONB CHECK (metadata IS NULL OR jsonb_typeof(metadata) = 'object'),
    reverses        BIGINT REFERENCES entries (id),
    -- The inserting transaction. Ids are taken at insert, not at commit, so
    -- entry 100 can become visible after 101; the rollup follows commit order
    -- through this column instead (DESIGN.md, invariant 3).
    tx_id           XID8        NOT NULL DEFAULT pg_current_xact_id()
);

-- Exactly once: a retried post finds its first row here.
CREATE UNIQUE INDEX entries_idempotency ON entries (account, idempotency_key);
-- An entry is reversed at most once.
CREATE UNIQUE INDEX entries_reverses ON entries (reverses) WHERE reverses IS NOT NULL;
-- Listing an account's rows in id order (keyset pagination).
CREATE INDEX entries_account_id ON entries (account, id);
-- The rollup reads the unfolded tail in (tx_id, id) order.
CREATE INDEX entries_tx_id ON entries (tx_id, id);

-- Append-only, enforced by the database itself so that neither a bug nor a
-- hand-typed statement can rewrite history. Corrections are new entries.
CREATE FUNCTION entries_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: entries cannot be %d; post a correcting entry or a reversal',
        lower(TG_OP)
        USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER entries_refuse_update_delete BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION entries_refuse_change();
CREATE TRIGGER entries_refuse_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION entries_refuse_change();

-- API keys, stored as SHA-256 hashes of the plaintext.
CREATE TABLE api_keys (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       TEXT,
    role       TEXT        NOT NULL CHECK (role IN ('admin', 'service', 'reader')),
    account    TEXT,
    key_hash   TEXT        NOT NULL UNIQUE,
    prefix     TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    revoked_at TIMESTAMPTZ
);
