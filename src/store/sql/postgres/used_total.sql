-- Used over all time (a running balance such as storage): every monthly total
-- plus the unfolded tail, in one statement.
SELECT (
    COALESCE((SELECT SUM(amount) FROM monthly_totals WHERE account = $1 AND resource = $2), 0)
  + COALESCE((
        SELECT SUM(e.amount) FROM entries AS e, rollup_cursor AS c
        WHERE c.name = 'rollup' AND (e.tx_id, e.id) > (c.last_tx, c.last_id)
          AND e.account = $1 AND e.resource = $2
    ), 0)
)::bigint
