-- Totals hold whole minor units. Since 0011 their amount is NUMERIC (to pass
-- 64 bits), which would also take a fraction, NaN or ±Infinity, and only a
-- hand edit can put one there (UPDATE daily_totals SET amount = 1.31: the
-- minor unit is easy to forget). `tally verify` cannot compare such a total
-- with the ledger, so it stopped with "cannot judge" (exit 2) and no
-- location. Refused here instead, as the ledger refuses edits: the database
-- says which row and why.
--
-- trunc() keeps NaN and ±Infinity as they are, so "= trunc" alone lets them
-- through; the bound refuses them (NaN sorts above every number here) and
-- is far past any sum of entries (10^15 each). No 'Infinity' literal: a
-- NUMERIC infinity only exists from PostgreSQL 14.
--
-- Checking the rows already there reads both tables once, and fails the
-- migration on a row that breaks the rule: docs/operations.md, on upgrades,
-- says how to find and correct it first.
ALTER TABLE daily_totals
    ADD CONSTRAINT daily_totals_whole_minor_units CHECK (amount = trunc(amount) AND abs(amount) < 1e38);
ALTER TABLE monthly_totals
    ADD CONSTRAINT monthly_totals_whole_minor_units CHECK (amount = trunc(amount) AND abs(amount) < 1e38);
