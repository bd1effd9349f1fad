-- INSERT OR REPLACE (and REPLACE) settle a conflict by deleting the row in
-- the way, and SQLite fires no DELETE trigger for that unless
-- recursive_triggers is on, which a hand-typed session does not set: one
-- such line could rewrite or drop an entry behind 0001's triggers. These
-- triggers run before the conflict is looked at, whatever the statement's
-- conflict clause, so a row that would replace another never gets that far.

-- An explicit id that is taken: Tally never gives one (AUTOINCREMENT does).
CREATE TRIGGER entries_refuse_replace_by_id BEFORE INSERT ON entries
WHEN EXISTS (SELECT 1 FROM entries WHERE id = NEW.id)
BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only: an entry with this id exists and cannot be replaced');
END;

-- A key that is taken: the row is skipped, which is what Tally's own
-- ON CONFLICT (account, idempotency_key) DO NOTHING does anyway (the caller
-- then reads the stored row, a duplicate or a conflict).
CREATE TRIGGER entries_refuse_replace_by_key BEFORE INSERT ON entries
WHEN EXISTS (SELECT 1 FROM entries WHERE account = NEW.account AND idempotency_key = NEW.idempotency_key)
BEGIN
    SELECT RAISE(IGNORE);
END;

-- A second reversal of one entry, under a key not yet taken (a taken key
-- is skipped above, as the retry of the first reversal must be): refused as
-- the unique index would, in words the store recognises
-- (map_reversal_violation). SQLite runs these triggers in no order one can
-- rely on, hence the key test here too.
CREATE TRIGGER entries_refuse_replace_reversal BEFORE INSERT ON entries
WHEN NEW.reverses IS NOT NULL
 AND EXISTS (SELECT 1 FROM entries WHERE reverses = NEW.reverses)
 AND NOT EXISTS (SELECT 1 FROM entries WHERE account = NEW.account AND idempotency_key = NEW.idempotency_key)
BEGIN
    SELECT RAISE(ABORT, 'UNIQUE constraint failed: entries.reverses (an entry is reversed at most once)');
END;
