-- Fold the ledger rows (?1, ?2] into monthly totals (UTC calendar months,
-- keyed by their first day).
INSERT INTO monthly_totals (account, resource, month, amount, entries)
SELECT account, resource, strftime('%Y-%m-01', occurred_at / 1000000, 'unixepoch'), SUM(amount), COUNT(*)
FROM entries
WHERE id > ?1 AND id <= ?2
GROUP BY 1, 2, 3
ON CONFLICT (account, resource, month) DO UPDATE
SET amount = amount + excluded.amount,
    entries = entries + excluded.entries
