-- Fold the ledger rows in ((tx, id) $1,$2 ; $3,$4] into daily and monthly
-- totals (UTC dates; a month is keyed by its first day), in one statement.
--
-- Why one statement: the batch's rows are read once. The months are summed
-- from the batch's daily sums (a month is the sum of its days), not from a
-- second pass over the ledger.
-- Why ORDER BY before each upsert: the totals are far larger than a batch's
-- share of them; in key order each index and heap page is visited once per
-- batch, not once per row.
-- SUM(bigint)::bigint and bigint + bigint raise on overflow rather than wrap.
-- Returns the number of ledger rows folded.
WITH daily AS MATERIALIZED (
    SELECT account, resource, (occurred_at AT TIME ZONE 'UTC')::date AS day,
           SUM(amount)::bigint AS amount, COUNT(*) AS entries
    FROM entries
    WHERE (tx_id, id) > ($1::text::xid8, $2) AND (tx_id, id) <= ($3::text::xid8, $4)
    GROUP BY 1, 2, 3
),
folded_days AS (
    INSERT INTO daily_totals AS t (account, resource, day, amount, entries)
    SELECT account, resource, day, amount, entries FROM daily
    ORDER BY account, resource, day
    ON CONFLICT (account, resource, day) DO UPDATE
    SET amount = t.amount + excluded.amount,
        entries = t.entries + excluded.entries
),
folded_months AS (
    INSERT INTO monthly_totals AS t (account, resource, month, amount, entries)
    SELECT account, resource, date_trunc('month', day::timestamp)::date, SUM(amount)::bigint, SUM(entries)::bigint
    FROM daily
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (account, resource, month) DO UPDATE
    SET amount = t.amount + excluded.amount,
        entries = t.entries + excluded.entries
)
SELECT COALESCE(SUM(entries), 0)::bigint AS folded FROM daily
