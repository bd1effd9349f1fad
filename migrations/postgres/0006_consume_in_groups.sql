-- Consume in groups: the consumes waiting at one instant are decided in one
-- call, one transaction and one commit (group commit). One consume alone is a
-- group of one, so this is the only consume function; `tally_consume` (0005)
-- goes, and so does `tally_unfolded_sum` (0004), which nothing calls since
-- 0005.
--
-- Why it keeps invariant 5 (no overshoot):
-- * Lock: every (account, resource) of the group is locked with the same
--   advisory lock as the multi-statement path, in ascending key order (two
--   groups sharing keys take them in one order and cannot deadlock), before
--   anything is read, and held to commit. READ COMMITTED only: each statement
--   after the locks takes a fresh snapshot, so it sees every consume that
--   committed before the locks were granted.
-- * Used: read once per (account, resource, period) of the group, after the
--   locks, with tally_used_settled (0005); then the group's own consumes are
--   added as they are recorded (the group is one transaction, so nothing else
--   can change that sum while the locks are held). Decisions for one
--   (account, resource) are taken in the order the consumes arrived
--   (ordinality); different (account, resource) pairs are independent.
-- * Replay, plan in force, override, the decision and the stored outcome:
--   exactly as tally_consume did, per consume, but read for the whole group in
--   one statement and appended in one INSERT (a statement costs more to start
--   than to run for one row). The caller never puts one (account, key) twice
--   in a group. A key taken meanwhile by a consume of another resource makes
--   the INSERT skip a row; the group then fails as a whole (its later
--   decisions counted that row) and the caller decides each consume alone;
--   alone, it answers 'conflict'.
--
-- p_rules: the catalog's rules of the group's resources, as
--   {"resource": {"plan": {"limit": n|null, "enforcement": "hard"|"soft",
--                           "window": "day"|"month"|"total", "price": "…"|null}}};
--   a plan that does not list the resource: unlimited, hard, month.
-- p_mark_*: the caller's settled-sum watermark per consume (see 0005), used
--   when its period is the consume's.
-- Returns one row per consume, `idx` its 1-based position in the arrays;
-- outcome 'recorded', 'rejected', 'replayed' or 'conflict'.
CREATE FUNCTION tally_consume_group(
    p_default_plan text, p_rules jsonb,
    p_accounts text[], p_resources text[], p_amounts bigint[], p_occurred_at timestamptz[],
    p_keys text[], p_sources text[], p_metadata text[], p_reverses bigint[],
    p_mark_starts date[], p_mark_ends date[], p_marks bigint[], p_settled bigint[]
) RETURNS TABLE (
    idx int, outcome text, entry_id bigint, used bigint, context text,
    period_start date, period_end date, mark bigint, settled bigint
) LANGUAGE plpgsql VOLATILE
-- Its statements take arrays, so PL/pgSQL's plan cache would plan them anew
-- for every group (custom plans: their estimates depend on the array lengths),
-- which cost more than running them for a small group. The generic plans are
-- index scans like the custom ones (tally_used_settled's included, checked
-- with EXPLAIN), so plan once per connection.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    n int := cardinality(p_accounts);
    c record;
    v_plan text;
    v_rule jsonb;
    v_limit bigint;
    v_enforcement text;
    v_window text;
    v_price text;
    v_start date;
    v_end date;
    v_same boolean;
    v_after numeric;
    v_ctx jsonb;
    u record;
    -- The (account, resource, window, period) whose `used` is in g_used.
    g_account text;
    g_resource text;
    g_window text;
    g_start date;
    g_end date;
    g_used bigint;
    g_mark bigint;
    g_settled bigint;
    -- The answers, by position in the arguments.
    o_outcome text[] := array_fill(NULL::text, ARRAY[n]);
    o_entry bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    o_used bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    o_context text[] := array_fill(NULL::text, ARRAY[n]);
    o_start date[] := array_fill(NULL::date, ARRAY[n]);
    o_end date[] := array_fill(NULL::date, ARRAY[n]);
    o_mark bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    o_settled bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    -- Positions to append.
    r_pos int[] := '{}';
    v_inserted int;
    v_positions int[];
    v_ids bigint[];
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'tally_consume_group needs READ COMMITTED, not %', current_setting('transaction_isolation');
    END IF;
    -- The sorted subquery feeds the locks in ascending order.
    PERFORM pg_advisory_xact_lock(l.lock_key)
       FROM (SELECT DISTINCT hashtextextended(a.account || chr(31) || a.resource, 7) AS lock_key
               FROM unnest(p_accounts, p_resources) AS a(account, resource)
              ORDER BY 1) AS l;

    -- After the locks: a fresh snapshot sees every consume committed before.
    FOR c IN
        SELECT q.n::int AS n, q.account, q.resource, q.amount, q.occurred_at,
               q.mark_start, q.mark_end, q.mark, q.settled,
               (SELECT e.id FROM entries AS e WHERE e.account = q.account AND e.idempotency_key = q.key) AS stored,
               (SELECT ap.plan FROM account_plans AS ap
                 WHERE ap.account = q.account AND ap.effective_at <= q.occurred_at
                 ORDER BY ap.effective_at DESC, ap.created_at DESC, ap.id DESC LIMIT 1) AS plan,
               ao.account IS NOT NULL AS has_override, ao.limit_amount AS override_limit,
               ao.enforcement AS override_enforcement, ao.limit_window AS override_window
          FROM unnest(p_accounts, p_resources, p_amounts, p_occurred_at, p_keys,
                      p_mark_starts, p_mark_ends, p_marks, p_settled)
               WITH ORDINALITY AS q(account, resource, amount, occurred_at, key, mark_start, mark_end, mark, settled, n)
          LEFT JOIN account_overrides AS ao
            ON ao.account = q.account AND ao.resource = q.resource
           AND (ao.expires_at IS NULL OR q.occurred_at < ao.expires_at)
         ORDER BY q.account, q.resource, q.n
    LOOP
        IF c.stored IS NOT NULL THEN
            o_outcome[c.n] := 'replayed';
            o_entry[c.n] := c.stored;
            CONTINUE;
        END IF;

        v_plan := COALESCE(c.plan, p_default_plan);
        v_rule := p_rules -> c.resource -> v_plan;
        IF v_rule IS NULL THEN
            v_limit := NULL;
            v_enforcement := 'hard';
            v_window := 'month';
            v_price := NULL;
        ELSE
            v_limit := (v_rule ->> 'limit')::bigint;
            v_enforcement := v_rule ->> 'enforcement';
            v_window := v_rule ->> 'window';
            v_price := v_rule ->> 'price';
        END IF;
        IF c.has_override THEN
            v_limit := c.override_limit;
            v_window := COALESCE(c.override_window, v_window);
            v_enforcement := COALESCE(c.override_enforcement, v_enforcement);
        END IF;

        v_start := NULL;
        v_end := NULL;
        IF v_window = 'day' THEN
            v_start := (c.occurred_at AT TIME ZONE 'UTC')::date;
            v_end := v_start + 1;
        ELSIF v_window = 'month' THEN
            v_start := date_trunc('month', c.occurred_at AT TIME ZONE 'UTC')::date;
            v_end := (v_start + interval '1 month')::date;
        END IF;

        IF g_account IS DISTINCT FROM c.account OR g_resource IS DISTINCT FROM c.resource
           OR g_window IS DISTINCT FROM v_window OR g_start IS DISTINCT FROM v_start OR g_end IS DISTINCT FROM v_end THEN
            v_same := c.mark_start IS NOT DISTINCT FROM v_start AND c.mark_end IS NOT DISTINCT FROM v_end;
            -- An expression, not a query: evaluated with a fresh snapshot
            -- (this function is VOLATILE), taken after the locks.
            u := tally_used_settled(c.account, c.resource, v_window, v_start,
                     COALESCE(v_start::timestamp AT TIME ZONE 'UTC', '-infinity'),
                     COALESCE(v_end::timestamp AT TIME ZONE 'UTC', 'infinity'),
                     CASE WHEN v_same THEN c.mark END, CASE WHEN v_same THEN c.settled END);
            g_account := c.account;
            g_resource := c.resource;
            g_window := v_window;
            g_start := v_start;
            g_end := v_end;
            g_used := u.used;
            g_mark := u.mark;
            g_settled := u.settled;
        END IF;
        o_used[c.n] := g_used;
        o_start[c.n] := v_start;
        o_end[c.n] := v_end;
        o_mark[c.n] := g_mark;
        o_settled[c.n] := g_settled;

        v_ctx := jsonb_build_object(
            'v', 2, 'plan', v_plan, 'window', v_window, 'limit', v_limit, 'enforcement', v_enforcement,
            'overage_price', v_price, 'period_start', v_start, 'period_end', v_end);
        v_after := g_used::numeric + c.amount;
        IF v_after > 9223372036854775807 OR v_after < -9223372036854775808
           OR (v_limit IS NOT NULL AND v_enforcement = 'hard' AND v_after > v_limit) THEN
            o_outcome[c.n] := 'rejected';
            o_context[c.n] := v_ctx::text;
            CONTINUE;
        END IF;
        o_outcome[c.n] := 'recorded';
        o_context[c.n] := (v_ctx || jsonb_build_object('used_after', v_after::bigint))::text;
        g_used := v_after::bigint;
        r_pos := r_pos || c.n;
    END LOOP;

    IF cardinality(r_pos) > 0 THEN
        WITH appended AS (
            INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key, source,
                                 metadata, reverses, consume_outcome)
            SELECT p_accounts[r.pos], p_resources[r.pos], p_amounts[r.pos], p_occurred_at[r.pos], now(),
                   p_keys[r.pos], p_sources[r.pos], p_metadata[r.pos]::jsonb, p_reverses[r.pos], o_context[r.pos]
              FROM unnest(r_pos) AS r(pos)
            ON CONFLICT (account, idempotency_key) DO NOTHING
            RETURNING entries.id, entries.account, entries.idempotency_key
        )
        SELECT (SELECT count(*) FROM appended), array_agg(r.pos), array_agg(a.id)
          INTO v_inserted, v_positions, v_ids
          FROM appended AS a
          JOIN unnest(r_pos) AS r(pos) ON a.account = p_accounts[r.pos] AND a.idempotency_key = p_keys[r.pos];
        -- Fewer rows than decided: a key was taken meanwhile by a consume of
        -- another resource, or (never from Tally) one (account, key) came
        -- twice; either way some decisions counted a row that is not there.
        IF n = 1 AND v_inserted = 0 THEN
            -- Alone, no other decision counted it: answer 'conflict' (the
            -- caller reports it as such; a retry gets the key's outcome).
            o_outcome[1] := 'conflict';
            o_context[1] := NULL;
        ELSIF v_inserted <> cardinality(r_pos) OR cardinality(v_positions) <> cardinality(r_pos) THEN
            RAISE EXCEPTION 'tally_consume_group: % consumes decided, % appended: a key was taken by a concurrent consume of another resource, or came twice',
                cardinality(r_pos), v_inserted
                USING ERRCODE = 'unique_violation';
        END IF;
        FOR i IN 1..v_inserted LOOP
            o_entry[v_positions[i]] := v_ids[i];
        END LOOP;
    END IF;

    RETURN QUERY
        SELECT o.n::int, o.outcome, o.entry_id, o.used, o.context, o.period_start, o.period_end, o.mark, o.settled
          FROM unnest(o_outcome, o_entry, o_used, o_context, o_start, o_end, o_mark, o_settled)
               WITH ORDINALITY AS o(outcome, entry_id, used, context, period_start, period_end, mark, settled, n);
END;
$$;

DROP FUNCTION tally_consume(text, text, bigint, timestamptz, text, text, text, bigint, text, text[], bigint[], text[],
                            text[], text[], date, date, bigint, bigint);
DROP FUNCTION tally_unfolded_sum;
