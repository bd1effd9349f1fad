-- Quota checks, consume and usage add the ledger rows the rollup has not
-- folded yet ((tx_id, id) past the cursor) for one account and resource.
-- Without this index PostgreSQL walks every row of the account through
-- entries_account_id and filters on tx_id, which grows with the ledger. The
-- INCLUDE columns let the sum run as an index-only scan.
CREATE INDEX entries_unfolded_tail ON entries (account, resource, tx_id, id) INCLUDE (occurred_at, amount);

-- The unfolded tail of one (account, resource) in [p_from, p_to).
--
-- Why a function: as a plain statement the cursor is a subquery the planner
-- cannot see, and once sqlx's prepared statement goes generic it estimates a
-- third of the account's rows and picks a sequential scan, so a check slowed
-- down as the ledger grew. EXECUTE plans with the cursor's actual values, and
-- the planner then knows the tail is small and range-scans
-- entries_unfolded_tail. STABLE: the function's queries see the calling
-- statement's snapshot, so "totals + tail" stays one snapshot.
CREATE FUNCTION tally_unfolded_sum(p_account text, p_resource text, p_from timestamptz, p_to timestamptz)
RETURNS numeric LANGUAGE plpgsql STABLE AS $$
DECLARE
    c_tx xid8;
    c_id bigint;
    total numeric;
BEGIN
    SELECT last_tx, last_id INTO c_tx, c_id FROM rollup_cursor WHERE name = 'rollup';
    EXECUTE 'SELECT SUM(amount) FROM entries
             WHERE account = $1 AND resource = $2 AND (tx_id, id) > ($3, $4)
               AND occurred_at >= $5 AND occurred_at < $6'
        INTO total
        USING p_account, p_resource, c_tx, c_id, p_from, p_to;
    RETURN COALESCE(total, 0);
END;
$$;
