-- Used in one period: the folded total of its bucket and the ledger tail the
-- rollup has not reached, in one statement (one snapshot), so a concurrent
-- rollup can neither hide nor double a row. The folded total is the sum of
-- the bucket's parts (migration 0011). Rust adds the two in 128 bits (SQL's
-- + would turn a sum past 64 bits into REAL). {high} and {low} are filled in
-- by `SumForm` (sqlite.rs): a plain SUM and 0, or, when that raised
-- "integer overflow", the two halves of each amount (a running sum may leave
-- 64 bits where the net fits). The last column is the largest ledger id the
-- statement sees: the settled watermark (every row up to it is final, see
-- store/settled.rs). ?3 is the bucket ('YYYY-MM-DD'); ?4/?5 the period in
-- µs. ?6 picks the table: 'day' or 'month'. The tail is an aggregate in FROM
-- (one row, always): read once for both halves.
SELECT
    COALESCE(CASE ?6
        WHEN 'day' THEN (SELECT {high} FROM daily_totals WHERE account = ?1 AND resource = ?2 AND day = ?3)
        ELSE (SELECT {high} FROM monthly_totals WHERE account = ?1 AND resource = ?2 AND month = ?3)
    END, 0),
    COALESCE(CASE ?6
        WHEN 'day' THEN (SELECT {low} FROM daily_totals WHERE account = ?1 AND resource = ?2 AND day = ?3)
        ELSE (SELECT {low} FROM monthly_totals WHERE account = ?1 AND resource = ?2 AND month = ?3)
    END, 0),
    COALESCE(tail.high, 0),
    COALESCE(tail.low, 0),
    (SELECT COALESCE(MAX(id), 0) FROM entries)
FROM (
    SELECT {high} AS high, {low} AS low FROM entries
    WHERE account = ?1 AND resource = ?2
      AND id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
      AND occurred_at >= ?4 AND occurred_at < ?5
) AS tail
