-- The rollup's staging tables, emptied: run before a batch is staged and
-- after it is written (which frees the staged rows).
--
-- Why TEMP: a batch is read and summed here before the rollup takes SQLite's
-- write lock, and writing a TEMP table needs no lock on the database file, so
-- posts go on meanwhile. TEMP tables belong to one connection, which is why
-- the rollup has a connection of its own (sqlite.rs).
-- Why WITHOUT ROWID keyed (account, resource, month, day): the days arrive
-- in that order from the GROUP BY's sort (a day's text sorts with its month),
-- the months are then summed from them in key order without another sort,
-- and both upserts read their rows in the totals' key order.
CREATE TEMP TABLE IF NOT EXISTS rollup_days (
    account  TEXT    NOT NULL,
    resource TEXT    NOT NULL,
    month    TEXT    NOT NULL,
    day      TEXT    NOT NULL,
    amount   INTEGER NOT NULL,
    entries  INTEGER NOT NULL,
    PRIMARY KEY (account, resource, month, day)
) STRICT, WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS rollup_months (
    account  TEXT    NOT NULL,
    resource TEXT    NOT NULL,
    month    TEXT    NOT NULL,
    amount   INTEGER NOT NULL,
    entries  INTEGER NOT NULL,
    PRIMARY KEY (account, resource, month)
) STRICT, WITHOUT ROWID;
DELETE FROM temp.rollup_days;
DELETE FROM temp.rollup_months;
