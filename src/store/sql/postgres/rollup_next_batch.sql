-- The next batch: up to $4 rows after the cursor ($1, $2) in commit order,
-- taking only rows whose transaction is below $3, the xmin of a snapshot, so
-- every such transaction has finished and no earlier row can still appear.
-- Returns the batch's last (tx_id, id) and its size.
WITH batch AS (
    SELECT tx_id, id
    FROM entries
    WHERE (tx_id, id) > ($1::text::xid8, $2) AND tx_id < $3::text::xid8
    ORDER BY tx_id, id
    LIMIT $4
)
SELECT last.tx_id::text AS last_tx, last.id AS last_id, (SELECT COUNT(*) FROM batch) AS size
FROM (SELECT tx_id, id FROM batch ORDER BY tx_id DESC, id DESC LIMIT 1) AS last
