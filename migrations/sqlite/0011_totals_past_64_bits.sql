-- A day's or month's total can pass 2^63 - 1 minor units while every entry
-- in it is valid (posting does not read totals: about 93 entries of
-- 999 999 999 999 999.99 on a resource with 2 decimals). Until now the rollup
-- batch that would fold them failed on every run, and every account's
-- entries behind it stayed unfolded.
--
-- SQLite has no integer wider than 64 bits, so a total may now be held in
-- several rows, its parts: part 0 is the one the rollup adds to, and the
-- rollup spills into parts 1, 2, … only when adding would leave 64 bits
-- (sqlite.rs, fold_with_parts). A total is the SUM of its parts; reads sum
-- them, and SQLite's integer SUM raises on overflow, so a total past 64 bits
-- is an error for reads of that one (account, resource) and nobody else's.
-- The table is rebuilt because SQLite cannot change a primary key in place.
CREATE TABLE daily_totals_with_parts (
    account  TEXT    NOT NULL,
    resource TEXT    NOT NULL,
    day      TEXT    NOT NULL,
    part     INTEGER NOT NULL DEFAULT 0,
    amount   INTEGER NOT NULL,
    entries  INTEGER NOT NULL,
    PRIMARY KEY (account, resource, day, part)
) STRICT, WITHOUT ROWID;
INSERT INTO daily_totals_with_parts (account, resource, day, part, amount, entries)
SELECT account, resource, day, 0, amount, entries FROM daily_totals;
DROP TABLE daily_totals;
ALTER TABLE daily_totals_with_parts RENAME TO daily_totals;

CREATE TABLE monthly_totals_with_parts (
    account  TEXT    NOT NULL,
    resource TEXT    NOT NULL,
    month    TEXT    NOT NULL,
    part     INTEGER NOT NULL DEFAULT 0,
    amount   INTEGER NOT NULL,
    entries  INTEGER NOT NULL,
    PRIMARY KEY (account, resource, month, part)
) STRICT, WITHOUT ROWID;
INSERT INTO monthly_totals_with_parts (account, resource, month, part, amount, entries)
SELECT account, resource, month, 0, amount, entries FROM monthly_totals;
DROP TABLE monthly_totals;
ALTER TABLE monthly_totals_with_parts RENAME TO monthly_totals;
