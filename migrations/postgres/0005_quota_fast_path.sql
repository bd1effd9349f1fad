-- Quota fast path: `used` whose cost does not grow with the unfolded tail, and
-- consume in one round trip.

-- What a consume answered, on its own ledger row: written once by the INSERT
-- that appends the entry (the ledger stays append-only), so a consume costs
-- one heap row and no foreign-key check instead of two rows and a row lock.
-- consume_outcomes (0003) keeps the outcomes recorded before this column;
-- readers take the column first, then that table. NULL: not from a consume.
-- Adding a nullable column without a default rewrites nothing.
ALTER TABLE entries ADD COLUMN consume_outcome TEXT;

-- Used in one period, from a settled watermark.
--
-- Why it is exact: a ledger row whose transaction id is below the snapshot's
-- xmin (`pg_snapshot_xmin`) belongs to a finished transaction, and no new row
-- can ever get such an id (ids only grow; the ledger is append-only). So "the
-- sum of the period's rows with tx_id < mark" never changes once computed: the
-- caller keeps it in memory as (p_mark, p_settled) and this function adds
-- only the rows with tx_id >= p_mark, range-scanning entries_unfolded_tail.
-- A rollup moves rows from the tail into the totals but never changes the sum
-- of the ledger rows, so the settled part survives it; a row another process
-- inserts has tx_id >= p_mark and is counted.
--
-- Without a usable watermark (none given, or one taken from a snapshot newer
-- than ours: its settled part could hold rows our snapshot does not see yet)
-- it computes the period cold: folded totals + unfolded tail, split at our
-- xmin. Every folded row is below our xmin (the rollup folds only rows below
-- its own snapshot's xmin, and that snapshot is older than ours).
--
-- Returns `used` and the new watermark (mark = our xmin, settled = sum of the
-- period's rows below it). STABLE: every query sees the calling statement's
-- snapshot, so `used` is the state of one snapshot (invariant 4).
-- p_table is 'day', 'month' or 'total'; p_bucket the period's first day.
CREATE FUNCTION tally_used_settled(
    p_account text, p_resource text, p_table text, p_bucket date,
    p_from timestamptz, p_to timestamptz, p_mark bigint, p_settled bigint,
    OUT used bigint, OUT mark bigint, OUT settled bigint
) LANGUAGE plpgsql STABLE AS $$
DECLARE
    x xid8 := pg_snapshot_xmin(pg_current_snapshot());
    m xid8;
    below numeric;
    above numeric;
    folded numeric;
    c_tx xid8;
    c_id bigint;
BEGIN
    IF p_mark IS NOT NULL AND p_settled IS NOT NULL THEN
        m := p_mark::text::xid8;
    END IF;
    IF m IS NOT NULL AND m <= x THEN
        SELECT SUM(amount) FILTER (WHERE tx_id < x), SUM(amount) FILTER (WHERE tx_id >= x)
          INTO below, above
          FROM entries
         WHERE account = p_account AND resource = p_resource AND tx_id >= m
           AND occurred_at >= p_from AND occurred_at < p_to;
        settled := p_settled + COALESCE(below, 0);
    ELSE
        SELECT last_tx, last_id INTO c_tx, c_id FROM rollup_cursor WHERE name = 'rollup';
        -- c_tx and c_id are parameters of this statement, so PL/pgSQL's plan
        -- cache plans it with their values (custom plans) until a generic plan
        -- is estimated as cheap: it range-scans entries_unfolded_tail (the
        -- subquery of a plain statement hid the cursor from the planner; see
        -- tally_unfolded_sum in 0004, which pays a parse and plan per call).
        SELECT CASE p_table
                   WHEN 'day' THEN (SELECT t.amount FROM daily_totals AS t
                                    WHERE t.account = p_account AND t.resource = p_resource AND t.day = p_bucket)
                   WHEN 'month' THEN (SELECT t.amount FROM monthly_totals AS t
                                      WHERE t.account = p_account AND t.resource = p_resource AND t.month = p_bucket)
                   ELSE (SELECT SUM(t.amount) FROM monthly_totals AS t
                         WHERE t.account = p_account AND t.resource = p_resource)
               END,
               SUM(e.amount) FILTER (WHERE e.tx_id < x), SUM(e.amount) FILTER (WHERE e.tx_id >= x)
          INTO folded, below, above
          FROM entries AS e
         WHERE e.account = p_account AND e.resource = p_resource AND (e.tx_id, e.id) > (c_tx, c_id)
           AND e.occurred_at >= p_from AND e.occurred_at < p_to;
        settled := (COALESCE(folded, 0) + COALESCE(below, 0))::bigint;
    END IF;
    used := (settled::numeric + COALESCE(above, 0))::bigint;
    mark := x::text::bigint;
END;
$$;

-- Consume in one round trip (one autocommit transaction): lock, replay, limit,
-- used, decide, append, remember the outcome.
--
-- * Lock: the same per-(account, resource) advisory lock as the multi-statement
--   path, held to commit. Refuses anything but READ COMMITTED: the statements
--   after the lock must each see a fresh snapshot, so `used` includes every
--   consume committed before the lock was granted (invariant 5).
-- * Replay: a row under (account, key) ends here with outcome 'replayed' and
--   its id; the caller compares contents and fetches the stored response.
-- * Limit: the plan in force at p_at (latest assignment effective by then,
--   ties by creation, then id: as `plan_at` in Rust) and an active override,
--   read after the lock, so a plan or override change is seen at once. The
--   catalog's rules for this resource come in as parallel arrays (p_plans,
--   p_limits, p_enforcements, p_windows, p_prices); a plan that does not list
--   the resource: unlimited, hard, month (as `effective_limit` in Rust).
-- * Used: tally_used_settled, with the caller's watermark when it is for the
--   same period (p_mark_start, p_mark_end).
-- * Decide: a hard limit passes when used + amount <= limit; any limit refuses
--   when used + amount leaves BIGINT (Rust's checked_add). No rates here:
--   resources with a per-minute rate take the multi-statement path.
-- * Append: the entry with its outcome (entries.consume_outcome): the
--   resolved limit as JSON plus used_after. Rust rebuilds the check fields and
--   warnings from it, the same way for the first answer and every replay.
-- outcome: 'recorded', 'rejected', 'replayed' or 'conflict' (the key was taken
-- by a concurrent request for another resource).
CREATE FUNCTION tally_consume(
    p_account text, p_resource text, p_amount bigint, p_occurred_at timestamptz,
    p_key text, p_source text, p_metadata text, p_reverses bigint,
    p_default_plan text, p_plans text[], p_limits bigint[], p_enforcements text[],
    p_windows text[], p_prices text[],
    p_mark_start date, p_mark_end date, p_mark bigint, p_settled bigint,
    OUT outcome text, OUT entry_id bigint, OUT used bigint, OUT context text,
    OUT period_start date, OUT period_end date, OUT mark bigint, OUT settled bigint
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_plan text;
    i int;
    v_limit bigint;
    v_enforcement text := 'hard';
    v_window text := 'month';
    v_price text;
    v_has_override boolean;
    v_override_limit bigint;
    v_override_enforcement text;
    v_override_window text;
    v_after numeric;
    v_ctx jsonb;
    v_same boolean;
    u record;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'tally_consume needs READ COMMITTED, not %', current_setting('transaction_isolation');
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended(p_account || chr(31) || p_resource, 7));

    -- One statement for the key, the plan in force and the override.
    SELECT (SELECT e.id FROM entries AS e WHERE e.account = p_account AND e.idempotency_key = p_key),
           (SELECT ap.plan FROM account_plans AS ap
             WHERE ap.account = p_account AND ap.effective_at <= p_occurred_at
             ORDER BY ap.effective_at DESC, ap.created_at DESC, ap.id DESC LIMIT 1),
           ao.account IS NOT NULL, ao.limit_amount, ao.enforcement, ao.limit_window
      INTO entry_id, v_plan, v_has_override, v_override_limit, v_override_enforcement, v_override_window
      FROM (SELECT) AS one
      LEFT JOIN account_overrides AS ao
        ON ao.account = p_account AND ao.resource = p_resource
       AND (ao.expires_at IS NULL OR p_occurred_at < ao.expires_at);
    IF entry_id IS NOT NULL THEN
        outcome := 'replayed';
        RETURN;
    END IF;

    v_plan := COALESCE(v_plan, p_default_plan);
    i := array_position(p_plans, v_plan);
    IF i IS NOT NULL THEN
        v_limit := p_limits[i];
        v_enforcement := p_enforcements[i];
        v_window := p_windows[i];
        v_price := p_prices[i];
    END IF;
    IF v_has_override THEN
        v_limit := v_override_limit;
        v_window := COALESCE(v_override_window, v_window);
        v_enforcement := COALESCE(v_override_enforcement, v_enforcement);
    END IF;

    IF v_window = 'day' THEN
        period_start := (p_occurred_at AT TIME ZONE 'UTC')::date;
        period_end := period_start + 1;
    ELSIF v_window = 'month' THEN
        period_start := date_trunc('month', p_occurred_at AT TIME ZONE 'UTC')::date;
        period_end := (period_start + interval '1 month')::date;
    END IF;

    v_same := p_mark_start IS NOT DISTINCT FROM period_start AND p_mark_end IS NOT DISTINCT FROM period_end;
    -- An expression, not a query: PL/pgSQL evaluates it on its fast path,
    -- with a fresh snapshot (this function is VOLATILE), taken after the lock.
    u := tally_used_settled(p_account, p_resource, v_window, period_start,
             COALESCE(period_start::timestamp AT TIME ZONE 'UTC', '-infinity'),
             COALESCE(period_end::timestamp AT TIME ZONE 'UTC', 'infinity'),
             CASE WHEN v_same THEN p_mark END, CASE WHEN v_same THEN p_settled END);
    used := u.used;
    mark := u.mark;
    settled := u.settled;

    v_ctx := jsonb_build_object(
        'v', 2, 'plan', v_plan, 'window', v_window, 'limit', v_limit, 'enforcement', v_enforcement,
        'overage_price', v_price, 'period_start', period_start, 'period_end', period_end);
    v_after := used::numeric + p_amount;
    IF v_after > 9223372036854775807 OR v_after < -9223372036854775808
       OR (v_limit IS NOT NULL AND v_enforcement = 'hard' AND v_after > v_limit) THEN
        outcome := 'rejected';
        context := v_ctx::text;
        RETURN;
    END IF;

    context := (v_ctx || jsonb_build_object('used_after', v_after::bigint))::text;
    INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key, source, metadata,
                         reverses, consume_outcome)
    VALUES (p_account, p_resource, p_amount, p_occurred_at, now(), p_key, p_source, p_metadata::jsonb,
            p_reverses, context)
    ON CONFLICT (account, idempotency_key) DO NOTHING
    RETURNING id INTO entry_id;
    IF entry_id IS NULL THEN
        outcome := 'conflict';
        context := NULL;
        RETURN;
    END IF;
    outcome := 'recorded';
END;
$$;
