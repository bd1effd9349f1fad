-- Used over all time (a running balance such as storage): every monthly total
-- plus the unfolded tail, in one statement. The cursor is read in a scalar
-- subquery so the tail is an index range on entries_unfolded_tail.
SELECT (
    COALESCE((SELECT SUM(amount) FROM monthly_totals WHERE account = $1 AND resource = $2), 0)
  + COALESCE((
        SELECT SUM(e.amount) FROM entries AS e
        WHERE e.account = $1 AND e.resource = $2
          AND (e.tx_id, e.id) > (SELECT last_tx, last_id FROM rollup_cursor WHERE name = 'rollup')
    ), 0)
)::bigint
