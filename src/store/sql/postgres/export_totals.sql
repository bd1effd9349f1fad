-- Totals per (account, resource, bucket) in [$1, $2) (bucket dates) for an
-- export: the folded totals plus every committed row past the cursor grouped
-- the same way, in one statement (one snapshot). $5/$6 bound occurred_at;
-- $3/$4 optionally narrow to an account / a resource.
-- {table}, {bucket} and {bucket_of_entry} are filled in for day or month.
-- The sum as text, exact: one past 64 bits is refused in Rust, naming its
-- total (see export_totals_tail.sql).
SELECT account, resource, bucket, SUM(amount)::text AS amount, SUM(entries)::bigint AS entries
FROM (
    SELECT account, resource, {bucket} AS bucket, amount, entries
    FROM {table}
    WHERE {bucket} >= $1 AND {bucket} < $2
      AND ($3::text IS NULL OR account = $3) AND ($4::text IS NULL OR resource = $4)
    UNION ALL
    SELECT e.account, e.resource, {bucket_of_entry}, e.amount, 1
    FROM entries AS e, rollup_cursor AS c
    WHERE c.name = 'rollup' AND (e.tx_id, e.id) > (c.last_tx, c.last_id)
      AND e.occurred_at >= $5 AND e.occurred_at < $6
      AND ($3::text IS NULL OR e.account = $3) AND ($4::text IS NULL OR e.resource = $4)
) AS combined
GROUP BY account, resource, bucket
-- COLLATE "C": byte order, the order Rust compares account names in when
-- invoices merge this stream with the accounts that have a plan.
ORDER BY account COLLATE "C", resource COLLATE "C", bucket
