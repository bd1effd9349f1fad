-- Fold the ledger rows in ((tx, id) $1,$2 ; $3,$4] into daily totals (UTC dates).
-- SUM(bigint)::bigint and bigint + bigint raise on overflow rather than wrap.
INSERT INTO daily_totals (account, resource, day, amount, entries)
SELECT account, resource, (occurred_at AT TIME ZONE 'UTC')::date, SUM(amount)::bigint, COUNT(*)
FROM entries
WHERE (tx_id, id) > ($1::text::xid8, $2) AND (tx_id, id) <= ($3::text::xid8, $4)
GROUP BY 1, 2, 3
ON CONFLICT (account, resource, day) DO UPDATE
SET amount = daily_totals.amount + excluded.amount,
    entries = daily_totals.entries + excluded.entries
