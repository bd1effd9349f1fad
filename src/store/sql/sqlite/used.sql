-- Used in one period: the folded total of its bucket and the ledger tail the
-- rollup has not reached, in one statement (one snapshot), so a concurrent
-- rollup can neither hide nor double a row. Rust adds the two (checked: SQL's
-- + would turn a sum past 64 bits into REAL). The folded total is the SUM of
-- the bucket's parts (migration 0011), which raises past 64 bits. The third
-- column is the largest ledger id the statement sees: the settled watermark
-- (every row up to it is final, see store/settled.rs). ?3 is the bucket
-- ('YYYY-MM-DD'); ?4/?5 the period in µs. ?6 picks the table: 'day' or 'month'.
SELECT
    COALESCE(CASE ?6
        WHEN 'day' THEN (SELECT SUM(amount) FROM daily_totals WHERE account = ?1 AND resource = ?2 AND day = ?3)
        ELSE (SELECT SUM(amount) FROM monthly_totals WHERE account = ?1 AND resource = ?2 AND month = ?3)
    END, 0),
    COALESCE((
        SELECT SUM(amount) FROM entries
        WHERE account = ?1 AND resource = ?2
          AND id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
          AND occurred_at >= ?4 AND occurred_at < ?5
    ), 0),
    (SELECT COALESCE(MAX(id), 0) FROM entries)
