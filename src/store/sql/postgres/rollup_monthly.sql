-- Fold the ledger rows in ((tx, id) $1,$2 ; $3,$4] into monthly totals (UTC
-- calendar months, keyed by their first day).
INSERT INTO monthly_totals (account, resource, month, amount, entries)
SELECT account, resource, date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date, SUM(amount)::bigint, COUNT(*)
FROM entries
WHERE (tx_id, id) > ($1::text::xid8, $2) AND (tx_id, id) <= ($3::text::xid8, $4)
GROUP BY 1, 2, 3
ON CONFLICT (account, resource, month) DO UPDATE
SET amount = monthly_totals.amount + excluded.amount,
    entries = monthly_totals.entries + excluded.entries
