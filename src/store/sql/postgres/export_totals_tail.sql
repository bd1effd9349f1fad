-- The unfolded tail of a totals export: committed rows past the cursor with
-- occurred_at in [$1, $2), grouped per (account, resource, bucket) and sorted
-- like the folded totals it is merged into. Read in the same snapshot as the
-- folded totals (see postgres/export.rs). $3/$4 optionally narrow to an
-- account / a resource; {bucket_of_entry} is filled in for day or month.
-- The sum as text, exact: a tail past 64 bits is read into 128 bits (the
-- folded total it joins may bring it back), and an export that cannot write
-- it names its total, where ::bigint raised a bare "bigint out of range".
SELECT e.account, e.resource, {bucket_of_entry} AS bucket, SUM(e.amount)::text AS amount, COUNT(*) AS entries
FROM entries AS e, rollup_cursor AS c
WHERE c.name = 'rollup' AND (e.tx_id, e.id) > (c.last_tx, c.last_id)
  AND e.occurred_at >= $1 AND e.occurred_at < $2
  AND ($3::text IS NULL OR e.account = $3) AND ($4::text IS NULL OR e.resource = $4)
GROUP BY 1, 2, 3
-- COLLATE "C": byte order, the order the merge compares keys in.
ORDER BY e.account COLLATE "C", e.resource COLLATE "C", 3
