-- Sum the ledger rows (?1, ?2] per (account, resource, UTC day) into the
-- staging table, outside the write lock (rollup_stage_reset.sql). The only
-- read of the batch's rows. SUM over INTEGER is exact and raises on overflow;
-- the bucket is the UTC date of occurred_at (µs), its month the first day of
-- that date's month.
-- {bucket_of_entry}: an entry's UTC day (sqlite.rs, shape).
INSERT INTO temp.rollup_days (account, resource, month, day, amount, entries)
SELECT account, resource, substr(day, 1, 8) || '01', day, SUM(amount), COUNT(*)
FROM (
    SELECT account, resource, {bucket_of_entry} AS day, amount
    FROM entries
    WHERE id > ?1 AND id <= ?2
)
GROUP BY account, resource, day
