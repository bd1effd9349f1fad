-- What the monthly totals should hold: every folded ledger row, grouped afresh.
-- {bucket_of_entry}: an entry's UTC month (sqlite.rs, shape).
-- The sum comes in two halves, amount = high * 2^32 + low (>> is an
-- arithmetic shift): a plain SUM raises past 64 bits, and a total may pass
-- them (migration 0011). Rust joins them in 128 bits.
SELECT account, resource, {bucket_of_entry} AS bucket,
       SUM(amount >> 32) AS high, SUM(amount & 4294967295) AS low, COUNT(*) AS entries
FROM entries
WHERE id <= (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
GROUP BY 1, 2, 3
