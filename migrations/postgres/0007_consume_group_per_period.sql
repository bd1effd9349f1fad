-- Consume groups keep `used` per period: 0006 decided a group's consumes of
-- one (account, resource) in arrival order and re-read `used` whenever the
-- period changed from the previous consume's. Consumes dated on two days,
-- interleaved in one group, re-read each day's `used` from the ledger every
-- time, missing the group's own consumes of that day (recorded at the end, in
-- one INSERT): a day limit could be overshot (a test sending 80 consumes on two
-- days at once saw all 80 recorded against a limit of 10 a day).
--
-- Now the one statement after the locks also resolves each consume's limit,
-- window and period (the plan's rule, the override over it), and the loop
-- walks the consumes in (account, resource, window, period, arrival) order:
-- each period is contiguous, its `used` is read once (tally_used_settled, as
-- before) at its first consume, and the group's consumes are added to it as
-- they are recorded. Periods of one window never overlap, so they are decided
-- independently. Two windows of one (account, resource) in one group (a plan
-- or override that changes the window at an instant inside the group) do
-- overlap: a month's `used` would miss the group's consumes of a day in it.
-- That group raises SQLSTATE 'TL001' before anything is written, and the
-- caller decides each of its consumes alone.
--
-- Resolving the rules in SQL also moved a dozen PL/pgSQL assignments per
-- consume into the executor (a few per cent faster with pgbench on groups of
-- 8 and 64; docs/performance.md).
--
-- Arguments and answers as in 0006.
CREATE OR REPLACE FUNCTION tally_consume_group(
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
    v_after numeric;
    v_ctx jsonb;
    v_same boolean;
    u record;
    -- `used` of the current consume's (account, resource, window, period),
    -- with the group's consumes recorded so far.
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
        SELECT p.*,
               -- The first consume to decide of its (account, resource,
               -- window, period): where that period's `used` is read.
               p.stored IS NULL
                   AND (lag(p.account) OVER by_period IS DISTINCT FROM p.account
                        OR lag(p.resource) OVER by_period IS DISTINCT FROM p.resource
                        OR lag(p.win) OVER by_period IS DISTINCT FROM p.win
                        OR lag(p.p_start) OVER by_period IS DISTINCT FROM p.p_start) AS first_of_period,
               -- Consumes to decide of one (account, resource) counted
               -- over two windows (a plan or override changing the window
               -- within the group): a month's `used` would miss the
               -- group's consumes of a day in it.
               min(p.win) FILTER (WHERE p.stored IS NULL) OVER same_key
                   IS DISTINCT FROM max(p.win) FILTER (WHERE p.stored IS NULL) OVER same_key AS two_windows
          FROM (
            SELECT w.*,
                   CASE w.win WHEN 'day' THEN w.p_start + 1
                              WHEN 'month' THEN (w.p_start + interval '1 month')::date END AS p_end
              FROM (
                SELECT l.*,
                       CASE l.win WHEN 'day' THEN (l.occurred_at AT TIME ZONE 'UTC')::date
                                  WHEN 'month' THEN date_trunc('month', l.occurred_at AT TIME ZONE 'UTC')::date
                       END AS p_start
                  FROM (
                    SELECT k.*,
                           -- The plan's rule (a plan that does not list the
                           -- resource: unlimited, hard, month), the override over it.
                           CASE WHEN k.has_override THEN k.override_limit ELSE (k.rule ->> 'limit')::bigint END AS lim,
                           COALESCE(CASE WHEN k.has_override THEN k.override_enforcement END,
                                    k.rule ->> 'enforcement', 'hard') AS enforcement,
                           COALESCE(CASE WHEN k.has_override THEN k.override_window END,
                                    k.rule ->> 'window', 'month') AS win,
                           k.rule ->> 'price' AS price
                      FROM (
                        SELECT q.n::int AS n, q.account, q.resource, q.amount, q.occurred_at,
                               q.mark_start, q.mark_end, q.mark, q.settled,
                               (SELECT e.id FROM entries AS e
                                 WHERE e.account = q.account AND e.idempotency_key = q.key) AS stored,
                               pl.plan, p_rules -> q.resource -> pl.plan AS rule,
                               ao.account IS NOT NULL AS has_override, ao.limit_amount AS override_limit,
                               ao.enforcement AS override_enforcement, ao.limit_window AS override_window
                          FROM unnest(p_accounts, p_resources, p_amounts, p_occurred_at, p_keys,
                                      p_mark_starts, p_mark_ends, p_marks, p_settled)
                               WITH ORDINALITY AS q(account, resource, amount, occurred_at, key,
                                                    mark_start, mark_end, mark, settled, n)
                         CROSS JOIN LATERAL (
                               SELECT COALESCE((SELECT ap.plan FROM account_plans AS ap
                                                 WHERE ap.account = q.account AND ap.effective_at <= q.occurred_at
                                                 ORDER BY ap.effective_at DESC, ap.created_at DESC, ap.id DESC
                                                 LIMIT 1), p_default_plan) AS plan) AS pl
                          LEFT JOIN account_overrides AS ao
                            ON ao.account = q.account AND ao.resource = q.resource
                           AND (ao.expires_at IS NULL OR q.occurred_at < ao.expires_at)
                        -- Not flattened: each lookup runs once per consume, not once per use.
                        OFFSET 0
                      ) AS k
                  ) AS l
              ) AS w
          ) AS p
        WINDOW by_period AS (PARTITION BY p.stored IS NULL ORDER BY p.account, p.resource, p.win, p.p_start, p.n),
               same_key AS (PARTITION BY p.account, p.resource)
         ORDER BY p.account, p.resource, p.win, p.p_start, p.n
    LOOP
        IF c.stored IS NOT NULL THEN
            o_outcome[c.n] := 'replayed';
            o_entry[c.n] := c.stored;
            CONTINUE;
        END IF;

        IF c.two_windows THEN
            RAISE EXCEPTION 'tally_consume_group: %/% is counted over two windows in one group; decide its consumes one at a time',
                c.account, c.resource
                USING ERRCODE = 'TL001';
        END IF;
        IF c.first_of_period THEN
            v_same := c.mark_start IS NOT DISTINCT FROM c.p_start AND c.mark_end IS NOT DISTINCT FROM c.p_end;
            -- An expression, not a query: evaluated with a fresh snapshot
            -- (this function is VOLATILE), taken after the locks.
            u := tally_used_settled(c.account, c.resource, c.win, c.p_start,
                     COALESCE(c.p_start::timestamp AT TIME ZONE 'UTC', '-infinity'),
                     COALESCE(c.p_end::timestamp AT TIME ZONE 'UTC', 'infinity'),
                     CASE WHEN v_same THEN c.mark END, CASE WHEN v_same THEN c.settled END);
            g_used := u.used;
            g_mark := u.mark;
            g_settled := u.settled;
        END IF;
        o_used[c.n] := g_used;
        o_start[c.n] := c.p_start;
        o_end[c.n] := c.p_end;
        o_mark[c.n] := g_mark;
        o_settled[c.n] := g_settled;

        v_ctx := jsonb_build_object(
            'v', 2, 'plan', c.plan, 'window', c.win, 'limit', c.lim, 'enforcement', c.enforcement,
            'overage_price', c.price, 'period_start', c.p_start, 'period_end', c.p_end);
        v_after := g_used::numeric + c.amount;
        IF v_after > 9223372036854775807 OR v_after < -9223372036854775808
           OR (c.lim IS NOT NULL AND c.enforcement = 'hard' AND v_after > c.lim) THEN
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

