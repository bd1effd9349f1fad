-- Fold the ledger rows in ((tx, id) $1,$2 ; $3,$4] into daily and monthly
-- totals (UTC dates; a month is keyed by its first day), in one statement.
-- Returns the number of ledger rows folded.
--
-- Why one statement: the batch's rows are read once.
-- Why GROUPING SETS: one sort by (account, resource, month, day) yields both
-- the days and, as the subtotals of that order, the months; there is no
-- second pass over the ledger and no second sort or hash of the days. The
-- rows leave the aggregate in key order, and a CTE scan keeps that order, so
-- the inserts below visit each index page once per batch. (An ORDER BY on the
-- CTE would sort again: the planner cannot see that its rows are sorted. The
-- order is for speed only.)
-- Why UPDATE + INSERT instead of INSERT … ON CONFLICT DO UPDATE: an upsert
-- inserts speculatively (check the index, insert, insert into the index,
-- confirm: one more WAL record per row), which cost about twice a plain
-- insert here (docs/performance.md). This is safe only because nothing else
-- writes the totals and batches are serialised by the rollup's advisory
-- lock, taken before this statement: in READ COMMITTED its snapshot holds
-- every earlier batch, so "exists in the snapshot" is "exists". All parts of
-- one statement share that snapshot: the UPDATE changes the keys that exist,
-- the INSERT adds those that do not; the two never meet. Were a total
-- inserted behind the lock's back, the INSERT would fail on the primary key
-- and the batch roll back, never count twice.
-- Why NUMERIC sums: a total may pass 64 bits while every entry is valid, and
-- the totals are NUMERIC (migration 0011), so a batch always folds; reads
-- cast to BIGINT and fail for that one total, not the rollup for everyone.
WITH buckets AS MATERIALIZED (
    SELECT account, resource, month, day, SUM(amount) AS amount, COUNT(*) AS entries,
           GROUPING(day) = 1 AS whole_month
    FROM (
        SELECT account, resource, amount,
               date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date AS month,
               (occurred_at AT TIME ZONE 'UTC')::date AS day
        FROM entries
        WHERE (tx_id, id) > ($1::text::xid8, $2) AND (tx_id, id) <= ($3::text::xid8, $4)
    ) AS batch
    GROUP BY GROUPING SETS ((account, resource, month, day), (account, resource, month))
),
updated_days AS (
    UPDATE daily_totals AS t
    SET amount = t.amount + b.amount, entries = t.entries + b.entries
    FROM buckets AS b
    WHERE NOT b.whole_month AND (t.account, t.resource, t.day) = (b.account, b.resource, b.day)
),
inserted_days AS (
    INSERT INTO daily_totals (account, resource, day, amount, entries)
    SELECT b.account, b.resource, b.day, b.amount, b.entries
    FROM buckets AS b
    WHERE NOT b.whole_month
      AND NOT EXISTS (
          SELECT FROM daily_totals AS t
          WHERE (t.account, t.resource, t.day) = (b.account, b.resource, b.day)
      )
),
updated_months AS (
    UPDATE monthly_totals AS t
    SET amount = t.amount + b.amount, entries = t.entries + b.entries
    FROM buckets AS b
    WHERE b.whole_month AND (t.account, t.resource, t.month) = (b.account, b.resource, b.month)
),
inserted_months AS (
    INSERT INTO monthly_totals (account, resource, month, amount, entries)
    SELECT b.account, b.resource, b.month, b.amount, b.entries
    FROM buckets AS b
    WHERE b.whole_month
      AND NOT EXISTS (
          SELECT FROM monthly_totals AS t
          WHERE (t.account, t.resource, t.month) = (b.account, b.resource, b.month)
      )
)
SELECT COALESCE(SUM(entries), 0)::bigint AS folded FROM buckets WHERE whole_month
