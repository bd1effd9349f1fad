-- Totals hold whole minor units. Since 0011 their amount is NUMERIC (to pass
-- 64 bits), which would also take a fraction, and only a hand edit can put
-- one there (UPDATE daily_totals SET amount = 1.31: the minor unit is easy to
-- forget). `tally verify` cannot compare such a total with the ledger, so it
-- stopped with "cannot judge" (exit 2) and no location. Refused here instead,
-- as the ledger refuses edits: the database says which row and why. Checking
-- the existing rows reads both tables once.
ALTER TABLE daily_totals
    ADD CONSTRAINT daily_totals_whole_minor_units CHECK (amount = trunc(amount));
ALTER TABLE monthly_totals
    ADD CONSTRAINT monthly_totals_whole_minor_units CHECK (amount = trunc(amount));
