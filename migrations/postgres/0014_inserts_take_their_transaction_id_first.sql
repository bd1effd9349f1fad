-- Every statement that inserts ledger rows gets its transaction id before it
-- takes any row's id.
--
-- Why: the entries listing pages in id order, and before answering it waits
-- for the write transactions that may still hold ids at or below what it will
-- show (PgStore::listing_horizon). It finds them by their transaction ids.
-- Without this trigger a statement takes its first row's id (the identity
-- default, the first column) a moment before its transaction id (the tx_id
-- default, the last column), and a listing looking in that moment would not
-- see it as a writer. A BEFORE STATEMENT trigger runs before the statement
-- produces its first row, so before any id is taken.
CREATE FUNCTION entries_take_transaction_id() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_current_xact_id();
    RETURN NULL;
END;
$$;

CREATE TRIGGER entries_take_transaction_id BEFORE INSERT ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION entries_take_transaction_id();
