-- Totals as the ledger stood at recorded time $7: recomputed from the entries
-- recorded by then (the stored totals already include later ones), so an
-- export or invoice can be reproduced exactly after late entries arrive.
-- The sum as text, exact: one past 64 bits is refused in Rust, naming its
-- total (see export_totals_tail.sql).
SELECT e.account, e.resource, {bucket_of_entry} AS bucket, SUM(e.amount)::text AS amount, COUNT(*) AS entries
FROM entries AS e
WHERE e.recorded_at <= $7
  AND e.occurred_at >= $5 AND e.occurred_at < $6
  AND ($3::text IS NULL OR e.account = $3) AND ($4::text IS NULL OR e.resource = $4)
  AND $1::date IS NOT NULL AND $2::date IS NOT NULL
GROUP BY 1, 2, 3
-- COLLATE "C": byte order, as Rust compares account names (see export_totals.sql).
ORDER BY e.account COLLATE "C", e.resource COLLATE "C", 3
