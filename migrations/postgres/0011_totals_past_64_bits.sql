-- A day's or month's total can pass 2^63 - 1 minor units while every entry
-- in it is valid (posting does not read totals: about 93 entries of
-- 999 999 999 999 999.99 on a resource with 2 decimals). Until now the rollup
-- batch that would fold them failed on every run, and every account's
-- entries behind it stayed unfolded.
--
-- NUMERIC holds any such total exactly, so the rollup always folds. Reads
-- still answer in 64-bit minor units: their casts to BIGINT raise on
-- overflow (22003), an error for reads of that one (account, resource) and
-- nobody else's. tally_used_settled (0005) already sums in NUMERIC.
-- SQLite keeps such a total in several rows instead (its 0011).
--
-- This rewrites both tables once, under an exclusive lock: on a large
-- database run `tally migrate` in a quiet moment (docs/operations.md).
ALTER TABLE daily_totals ALTER COLUMN amount TYPE NUMERIC;
ALTER TABLE monthly_totals ALTER COLUMN amount TYPE NUMERIC;
