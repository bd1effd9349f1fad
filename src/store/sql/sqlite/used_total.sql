-- Used over all time (a running balance such as storage): every monthly total
-- (all their parts, migration 0011) and the unfolded tail, in one statement,
-- each sum read and added as in used.sql; then the
-- largest ledger id the statement sees: the settled watermark (see
-- store/settled.rs).
SELECT
    COALESCE((SELECT {high} FROM monthly_totals WHERE account = ?1 AND resource = ?2), 0),
    COALESCE((SELECT {low} FROM monthly_totals WHERE account = ?1 AND resource = ?2), 0),
    COALESCE(tail.high, 0),
    COALESCE(tail.low, 0),
    (SELECT COALESCE(MAX(id), 0) FROM entries)
FROM (
    SELECT {high} AS high, {low} AS low FROM entries
    WHERE account = ?1 AND resource = ?2
      AND id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
) AS tail
