-- Used in one period: the folded total of its bucket plus every committed
-- ledger row past the cursor, in one statement (one snapshot), so a concurrent
-- rollup can neither hide nor double a row. $3 is the bucket date, $4/$5 the
-- period, $6 picks the table: 'day' or 'month'. The cursor is read in a
-- scalar subquery so the tail is an index range on entries_unfolded_tail.
SELECT (
    COALESCE(CASE $6::text
        WHEN 'day' THEN (SELECT amount FROM daily_totals WHERE account = $1 AND resource = $2 AND day = $3)
        ELSE (SELECT amount FROM monthly_totals WHERE account = $1 AND resource = $2 AND month = $3)
    END, 0)
  + COALESCE((
        SELECT SUM(e.amount) FROM entries AS e
        WHERE e.account = $1 AND e.resource = $2
          AND (e.tx_id, e.id) > (SELECT last_tx, last_id FROM rollup_cursor WHERE name = 'rollup')
          AND e.occurred_at >= $4 AND e.occurred_at < $5
    ), 0)
)::bigint
