-- A consume group inserts its rows in the order batches do: by (account,
-- idempotency key), byte by byte (COLLATE "C" orders text as Rust's sort in
-- `insert_entries` does). The group inserted them in decision order; a
-- group and a batch sharing two keys could then each hold one and wait for
-- the other, and PostgreSQL cancelled one of them to break the deadlock
-- (review AM: the batch answered 500, then 503 to send again since
-- 99bf881). Decisions are made as before; only the insert is ordered.
--
-- The bodies are 0019's but for that ORDER BY (a migration redefines a
-- function whole); the signatures are unchanged, so binaries from 0019 on
-- keep working against an upgraded database.
-- SQLite writes one transaction at a time: its 0020 changes nothing.
CREATE OR REPLACE FUNCTION tally_consume_group(
    p_default_plan text, p_rules jsonb,
    p_accounts text[], p_resources text[], p_amounts bigint[], p_occurred_at timestamptz[],
    p_keys text[], p_sources text[], p_metadata text[], p_reverses bigint[],
    p_mark_starts date[], p_mark_ends date[], p_marks bigint[], p_settled bigint[],
    p_recorded_at timestamptz
) RETURNS TABLE (
    idx int, outcome text, entry_id bigint, used bigint, context text,
    period_start date, period_end date, mark bigint, settled bigint
) LANGUAGE plpgsql VOLATILE
-- As in 0006: plan each statement once per connection.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    n int := cardinality(p_accounts);
    c record;
    v_after numeric;
    v_same boolean;
    u record;
    -- `used` of the current consume's (account, resource, window, period),
    -- with the group's consumes recorded so far.
    g_used bigint;
    g_mark bigint;
    g_settled bigint;
    -- The previous consume decided (replays are not), to find a second
    -- window of one (account, resource).
    l_account text;
    l_resource text;
    l_window text;
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
    v_id bigint;
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
        SELECT g.*, warm.below, warm.above
          FROM (
            SELECT f.*,
                   -- The caller's watermark holds: at the period's first
                   -- consume, for this period, not newer than this snapshot.
                   f.first_of_period AND f.mark IS NOT NULL AND f.settled IS NOT NULL
                       AND f.mark_start IS NOT DISTINCT FROM f.p_start AND f.mark_end IS NOT DISTINCT FROM f.p_end
                       AND f.mark::text::xid8 <= f.snapshot_xmin AS known
              FROM (
                SELECT p.*,
                       pg_snapshot_xmin(pg_current_snapshot()) AS snapshot_xmin,
                       -- The first consume to decide of its (account, resource,
                       -- window, period): where that period's `used` is read.
                       p.stored IS NULL
                           AND (lag(p.account) OVER by_period IS DISTINCT FROM p.account
                                OR lag(p.resource) OVER by_period IS DISTINCT FROM p.resource
                                OR lag(p.win) OVER by_period IS DISTINCT FROM p.win
                                OR lag(p.p_start) OVER by_period IS DISTINCT FROM p.p_start) AS first_of_period,
                       -- The outcome without used_after and the closing brace.
                       '{"v":2,"plan":' || COALESCE(to_json(p.plan)::text, 'null')
                           || ',"window":' || to_json(p.win)::text
                           || ',"limit":' || COALESCE(p.lim::text, 'null')
                           || ',"enforcement":' || to_json(p.enforcement)::text
                           || ',"overage_price":' || COALESCE(to_json(p.price)::text, 'null')
                           || ',"period_start":' || COALESCE(to_json(p.p_start)::text, 'null')
                           || ',"period_end":' || COALESCE(to_json(p.p_end)::text, 'null') AS outcome_head
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
                                       ao.removed IS NOT NULL AS has_override, ao.limit_amount AS override_limit,
                                       ao.enforcement AS override_enforcement, ao.limit_window AS override_window
                                  FROM unnest(p_accounts, p_resources, p_amounts, p_occurred_at, p_keys,
                                              p_mark_starts, p_mark_ends, p_marks, p_settled)
                                       WITH ORDINALITY AS q(account, resource, amount, occurred_at, key,
                                                            mark_start, mark_end, mark, settled, n)
                                 CROSS JOIN LATERAL (
                                       SELECT COALESCE((SELECT ap.plan FROM account_plans AS ap
                                                         WHERE ap.account = q.account AND ap.effective_at <= q.occurred_at
                                                         ORDER BY ap.effective_at DESC, ap.created_at DESC, ap.id DESC
                                                         LIMIT 1), p_default_plan) AS plan
                                        -- Not flattened: `plan` is used twice below, and a
                                        -- flattened subquery would be looked up twice.
                                        OFFSET 0) AS pl
                                  -- The override in force at the consume's instant: the
                                  -- latest change made by then, unless it removed the
                                  -- override or the override had expired by then.
                                  LEFT JOIN LATERAL (
                                       SELECT h.limit_amount, h.enforcement, h.limit_window,
                                              h.expires_at, h.removed
                                         FROM account_override_history AS h
                                        WHERE h.account = q.account AND h.resource = q.resource
                                          AND h.changed_at <= q.occurred_at
                                        ORDER BY h.changed_at DESC, h.id DESC
                                        LIMIT 1) AS ao
                                    ON NOT ao.removed
                                   AND (ao.expires_at IS NULL OR q.occurred_at < ao.expires_at)
                                -- Not flattened: each lookup runs once per consume, not once per use.
                                OFFSET 0
                              ) AS k
                          ) AS l
                      ) AS w
                  ) AS p
                WINDOW by_period AS (PARTITION BY p.stored IS NULL ORDER BY p.account, p.resource, p.win, p.p_start, p.n)
              ) AS f
          ) AS g
          -- `used` from the caller's watermark (tally_used_settled's warm
          -- branch, set-based) where it holds. `known` is in WHERE, not in a
          -- LEFT JOIN's ON: as a one-time filter it skips the scan, where ON
          -- would filter the aggregate after it ran for every consume.
          CROSS JOIN LATERAL (
            SELECT SUM(e.amount) FILTER (WHERE e.tx_id < g.snapshot_xmin) AS below,
                   SUM(e.amount) FILTER (WHERE e.tx_id >= g.snapshot_xmin) AS above
              FROM entries AS e
             WHERE g.known
               AND e.account = g.account AND e.resource = g.resource AND e.tx_id >= g.mark::text::xid8
               AND e.occurred_at >= COALESCE(g.p_start::timestamp AT TIME ZONE 'UTC', '-infinity')
               AND e.occurred_at < COALESCE(g.p_end::timestamp AT TIME ZONE 'UTC', 'infinity')
          ) AS warm
         ORDER BY g.account, g.resource, g.win, g.p_start, g.n
    LOOP
        IF c.stored IS NOT NULL THEN
            o_outcome[c.n] := 'replayed';
            o_entry[c.n] := c.stored;
            CONTINUE;
        END IF;

        IF c.account = l_account AND c.resource = l_resource AND c.win <> l_window THEN
            RAISE EXCEPTION 'tally_consume_group: %/% is counted over two windows in one group; decide its consumes one at a time',
                c.account, c.resource
                USING ERRCODE = 'TL001';
        END IF;
        l_account := c.account;
        l_resource := c.resource;
        l_window := c.win;

        IF c.first_of_period THEN
            IF c.known THEN
                g_settled := (c.settled + COALESCE(c.below, 0))::bigint;
                g_used := (g_settled::numeric + COALESCE(c.above, 0))::bigint;
                g_mark := c.snapshot_xmin::text::bigint;
            ELSE
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
        END IF;
        o_used[c.n] := g_used;
        o_start[c.n] := c.p_start;
        o_end[c.n] := c.p_end;
        o_mark[c.n] := g_mark;
        o_settled[c.n] := g_settled;

        v_after := g_used::numeric + c.amount;
        IF v_after > 9223372036854775807 OR v_after < -9223372036854775808
           OR (c.lim IS NOT NULL AND c.enforcement = 'hard' AND v_after > c.lim) THEN
            o_outcome[c.n] := 'rejected';
            o_context[c.n] := c.outcome_head || '}';
            CONTINUE;
        END IF;
        o_outcome[c.n] := 'recorded';
        o_context[c.n] := c.outcome_head || ',"used_after":' || v_after::text || '}';
        g_used := v_after::bigint;
        r_pos := r_pos || c.n;
    END LOOP;

    IF cardinality(r_pos) > 0 AND n > 1 THEN
        -- A key taken meanwhile fails the group (unique_violation); the
        -- caller then decides each consume alone. Rows go in by (account,
        -- key) in byte order, the order batches insert in (insert_entries),
        -- so a group and a batch sharing keys never wait on each other in a
        -- cycle (0020).
        WITH appended AS (
            INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key, source,
                                 metadata, reverses, consume_outcome)
            SELECT p_accounts[r.pos], p_resources[r.pos], p_amounts[r.pos], p_occurred_at[r.pos], p_recorded_at,
                   p_keys[r.pos], p_sources[r.pos], p_metadata[r.pos]::jsonb, p_reverses[r.pos], o_context[r.pos]
              FROM unnest(r_pos) AS r(pos)
             ORDER BY p_accounts[r.pos] COLLATE "C", p_keys[r.pos] COLLATE "C"
            RETURNING entries.id, entries.account, entries.idempotency_key
        )
        SELECT array_agg(r.pos), array_agg(a.id)
          INTO v_positions, v_ids
          FROM appended AS a
          JOIN unnest(r_pos) AS r(pos) ON a.account = p_accounts[r.pos] AND a.idempotency_key = p_keys[r.pos];
        FOR i IN 1..cardinality(v_positions) LOOP
            o_entry[v_positions[i]] := v_ids[i];
        END LOOP;
    ELSIF cardinality(r_pos) > 0 THEN
        INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key, source,
                             metadata, reverses, consume_outcome)
        VALUES (p_accounts[1], p_resources[1], p_amounts[1], p_occurred_at[1], p_recorded_at,
                p_keys[1], p_sources[1], p_metadata[1]::jsonb, p_reverses[1], o_context[1])
        ON CONFLICT (account, idempotency_key) DO NOTHING
        RETURNING entries.id INTO v_id;
        IF v_id IS NULL THEN
            -- Alone, no other decision counted it: answer 'conflict' (the
            -- caller reports it as such; a retry gets the key's outcome).
            o_outcome[1] := 'conflict';
            o_context[1] := NULL;
        ELSE
            o_entry[1] := v_id;
        END IF;
    END IF;

    RETURN QUERY
        SELECT o.n::int, o.outcome, o.entry_id, o.used, o.context, o.period_start, o.period_end, o.mark, o.settled
          FROM unnest(o_outcome, o_entry, o_used, o_context, o_start, o_end, o_mark, o_settled)
               WITH ORDINALITY AS o(outcome, entry_id, used, context, period_start, period_end, mark, settled, n);
END;
$$;

CREATE OR REPLACE FUNCTION tally_consume_group_dated(
    p_default_plan text, p_rules jsonb,
    p_accounts text[], p_resources text[], p_amounts bigint[], p_occurred_at timestamptz[],
    p_keys text[], p_sources text[], p_metadata text[], p_reverses bigint[],
    p_mark_starts date[], p_mark_ends date[], p_marks bigint[], p_settled bigint[], p_now timestamptz[],
    p_recorded_at timestamptz
) RETURNS TABLE (
    idx int, outcome text, entry_id bigint, used bigint, context text,
    period_start date, period_end date, mark bigint, settled bigint
) LANGUAGE plpgsql VOLATILE
-- As in 0006: plan each statement once per connection.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    n int := cardinality(p_accounts);
    c record;
    v_after numeric;
    v_same boolean;
    v_undecided boolean;
    u record;
    -- `used` of the current consume's (account, resource, window, period),
    -- with the group's consumes recorded so far.
    g_used bigint;
    g_mark bigint;
    g_settled bigint;
    -- The previous consume decided (replays are not), to find a second
    -- window of one (account, resource).
    l_account text;
    l_resource text;
    l_window text;
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
    v_id bigint;
    v_positions int[];
    v_ids bigint[];
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'tally_consume_group_dated needs READ COMMITTED, not %', current_setting('transaction_isolation');
    END IF;
    -- The sorted subquery feeds the locks in ascending order.
    PERFORM pg_advisory_xact_lock(l.lock_key)
       FROM (SELECT DISTINCT hashtextextended(a.account || chr(31) || a.resource, 7) AS lock_key
               FROM unnest(p_accounts, p_resources) AS a(account, resource)
              ORDER BY 1) AS l;

    -- After the locks: a fresh snapshot sees every consume committed before.
    FOR c IN
        SELECT g.*, warm.below, warm.above
          FROM (
            SELECT f.*,
                   -- The caller's watermark holds: at the period's first
                   -- consume, for this period, not newer than this snapshot.
                   f.first_of_period AND f.mark IS NOT NULL AND f.settled IS NOT NULL
                       AND f.mark_start IS NOT DISTINCT FROM f.p_start AND f.mark_end IS NOT DISTINCT FROM f.p_end
                       AND f.mark::text::xid8 <= f.snapshot_xmin AS known
              FROM (
                SELECT p.*,
                       pg_snapshot_xmin(pg_current_snapshot()) AS snapshot_xmin,
                       -- The first consume to decide of its (account, resource,
                       -- window, period): where that period's `used` is read.
                       p.stored IS NULL
                           AND (lag(p.account) OVER by_period IS DISTINCT FROM p.account
                                OR lag(p.resource) OVER by_period IS DISTINCT FROM p.resource
                                OR lag(p.win) OVER by_period IS DISTINCT FROM p.win
                                OR lag(p.p_start) OVER by_period IS DISTINCT FROM p.p_start) AS first_of_period,
                       -- The outcome without used_after and the closing brace.
                       '{"v":2,"plan":' || COALESCE(to_json(p.plan)::text, 'null')
                           || ',"window":' || to_json(p.win)::text
                           || ',"limit":' || COALESCE(p.lim::text, 'null')
                           || ',"enforcement":' || to_json(p.enforcement)::text
                           || ',"overage_price":' || COALESCE(to_json(p.price)::text, 'null')
                           || ',"period_start":' || COALESCE(to_json(p.p_start)::text, 'null')
                           || ',"period_end":' || COALESCE(to_json(p.p_end)::text, 'null') AS outcome_head,
                       -- The same for the limit in force now (its window is
                       -- this one's whenever it is read).
                       CASE WHEN p.held_now THEN
                           '{"v":2,"plan":' || COALESCE(to_json(p.plan_now)::text, 'null')
                           || ',"window":' || to_json(p.win)::text
                           || ',"limit":' || COALESCE(p.lim_now::text, 'null')
                           || ',"enforcement":' || to_json(p.enforcement_now)::text
                           || ',"overage_price":' || COALESCE(to_json(p.price_now)::text, 'null')
                           || ',"period_start":' || COALESCE(to_json(p.p_start)::text, 'null')
                           || ',"period_end":' || COALESCE(to_json(p.p_end)::text, 'null')
                       END AS outcome_head_now
                  FROM (
                    SELECT v.*,
                           -- Held to the limit in force now too: dated, and the
                           -- window that limit counts in now holds the consume.
                           v.now_at IS NOT NULL
                               AND (v.win_now = 'total'
                                    OR (v.occurred_at >= v.p_start_now::timestamp AT TIME ZONE 'UTC'
                                        AND v.occurred_at < v.p_end_now::timestamp AT TIME ZONE 'UTC')) AS held_now
                      FROM (
                    SELECT w.*,
                           CASE w.win WHEN 'day' THEN w.p_start + 1
                                      WHEN 'month' THEN (w.p_start + interval '1 month')::date END AS p_end,
                           CASE w.win_now WHEN 'day' THEN w.p_start_now + 1
                                          WHEN 'month' THEN (w.p_start_now + interval '1 month')::date END AS p_end_now
                      FROM (
                        SELECT l.*,
                               CASE l.win WHEN 'day' THEN (l.occurred_at AT TIME ZONE 'UTC')::date
                                          WHEN 'month' THEN date_trunc('month', l.occurred_at AT TIME ZONE 'UTC')::date
                               END AS p_start,
                               CASE l.win_now WHEN 'day' THEN (l.now_at AT TIME ZONE 'UTC')::date
                                              WHEN 'month' THEN date_trunc('month', l.now_at AT TIME ZONE 'UTC')::date
                               END AS p_start_now
                          FROM (
                            SELECT k.*,
                                   -- The plan's rule (a plan that does not list the
                                   -- resource: unlimited, hard, month), the override over it.
                                   CASE WHEN k.has_override THEN k.override_limit ELSE (k.rule ->> 'limit')::bigint END AS lim,
                                   COALESCE(CASE WHEN k.has_override THEN k.override_enforcement END,
                                            k.rule ->> 'enforcement', 'hard') AS enforcement,
                                   COALESCE(CASE WHEN k.has_override THEN k.override_window END,
                                            k.rule ->> 'window', 'month') AS win,
                                   k.rule ->> 'price' AS price,
                                   -- The same in force now (NULL for a consume stamped now).
                                   CASE WHEN k.has_override_now THEN k.override_limit_now
                                        ELSE (k.rule_now ->> 'limit')::bigint END AS lim_now,
                                   COALESCE(CASE WHEN k.has_override_now THEN k.override_enforcement_now END,
                                            k.rule_now ->> 'enforcement', 'hard') AS enforcement_now,
                                   CASE WHEN k.now_at IS NOT NULL THEN
                                       COALESCE(CASE WHEN k.has_override_now THEN k.override_window_now END,
                                                k.rule_now ->> 'window', 'month')
                                   END AS win_now,
                                   k.rule_now ->> 'price' AS price_now
                              FROM (
                                SELECT q.n::int AS n, q.account, q.resource, q.amount, q.occurred_at,
                                       q.mark_start, q.mark_end, q.mark, q.settled,
                                       (SELECT e.id FROM entries AS e
                                         WHERE e.account = q.account AND e.idempotency_key = q.key) AS stored,
                                       pl.plan, p_rules -> q.resource -> pl.plan AS rule,
                                       ao.removed IS NOT NULL AS has_override, ao.limit_amount AS override_limit,
                                       ao.enforcement AS override_enforcement, ao.limit_window AS override_window,
                                       q.now_at, pn.plan AS plan_now, p_rules -> q.resource -> pn.plan AS rule_now,
                                       an.removed IS NOT NULL AS has_override_now, an.limit_amount AS override_limit_now,
                                       an.enforcement AS override_enforcement_now, an.limit_window AS override_window_now
                                  FROM unnest(p_accounts, p_resources, p_amounts, p_occurred_at, p_keys,
                                              p_mark_starts, p_mark_ends, p_marks, p_settled, p_now)
                                       WITH ORDINALITY AS q(account, resource, amount, occurred_at, key,
                                                            mark_start, mark_end, mark, settled, now_at, n)
                                 CROSS JOIN LATERAL (
                                       SELECT COALESCE((SELECT ap.plan FROM account_plans AS ap
                                                         WHERE ap.account = q.account AND ap.effective_at <= q.occurred_at
                                                         ORDER BY ap.effective_at DESC, ap.created_at DESC, ap.id DESC
                                                         LIMIT 1), p_default_plan) AS plan
                                        -- Not flattened: `plan` is used twice below, and a
                                        -- flattened subquery would be looked up twice.
                                        OFFSET 0) AS pl
                                  -- The override in force at the consume's instant: the
                                  -- latest change made by then, unless it removed the
                                  -- override or the override had expired by then.
                                  LEFT JOIN LATERAL (
                                       SELECT h.limit_amount, h.enforcement, h.limit_window,
                                              h.expires_at, h.removed
                                         FROM account_override_history AS h
                                        WHERE h.account = q.account AND h.resource = q.resource
                                          AND h.changed_at <= q.occurred_at
                                        ORDER BY h.changed_at DESC, h.id DESC
                                        LIMIT 1) AS ao
                                    ON NOT ao.removed
                                   AND (ao.expires_at IS NULL OR q.occurred_at < ao.expires_at)
                                  -- The plan and override in force now, for a dated consume
                                  -- only: `q.now_at IS NOT NULL` refers to the outer row
                                  -- alone, so it gates each lookup before it runs.
                                  LEFT JOIN LATERAL (
                                       SELECT COALESCE((SELECT ap.plan FROM account_plans AS ap
                                                         WHERE ap.account = q.account AND ap.effective_at <= q.now_at
                                                         ORDER BY ap.effective_at DESC, ap.created_at DESC, ap.id DESC
                                                         LIMIT 1), p_default_plan) AS plan
                                        WHERE q.now_at IS NOT NULL
                                        OFFSET 0) AS pn ON true
                                  LEFT JOIN LATERAL (
                                       SELECT h.limit_amount, h.enforcement, h.limit_window,
                                              h.expires_at, h.removed
                                         FROM account_override_history AS h
                                        WHERE q.now_at IS NOT NULL
                                          AND h.account = q.account AND h.resource = q.resource
                                          AND h.changed_at <= q.now_at
                                        ORDER BY h.changed_at DESC, h.id DESC
                                        LIMIT 1) AS an
                                    ON NOT an.removed
                                   AND (an.expires_at IS NULL OR q.now_at < an.expires_at)
                                -- Not flattened: each lookup runs once per consume, not once per use.
                                OFFSET 0
                              ) AS k
                          ) AS l
                      ) AS w
                      ) AS v
                  ) AS p
                WINDOW by_period AS (PARTITION BY p.stored IS NULL ORDER BY p.account, p.resource, p.win, p.p_start, p.n)
              ) AS f
          ) AS g
          -- `used` from the caller's watermark (tally_used_settled's warm
          -- branch, set-based) where it holds. `known` is in WHERE, not in a
          -- LEFT JOIN's ON: as a one-time filter it skips the scan, where ON
          -- would filter the aggregate after it ran for every consume.
          CROSS JOIN LATERAL (
            SELECT SUM(e.amount) FILTER (WHERE e.tx_id < g.snapshot_xmin) AS below,
                   SUM(e.amount) FILTER (WHERE e.tx_id >= g.snapshot_xmin) AS above
              FROM entries AS e
             WHERE g.known
               AND e.account = g.account AND e.resource = g.resource AND e.tx_id >= g.mark::text::xid8
               AND e.occurred_at >= COALESCE(g.p_start::timestamp AT TIME ZONE 'UTC', '-infinity')
               AND e.occurred_at < COALESCE(g.p_end::timestamp AT TIME ZONE 'UTC', 'infinity')
          ) AS warm
         ORDER BY g.account, g.resource, g.win, g.p_start, g.n
    LOOP
        IF c.stored IS NOT NULL THEN
            o_outcome[c.n] := 'replayed';
            o_entry[c.n] := c.stored;
            CONTINUE;
        END IF;

        -- Held to a limit in force now over another window: decided by
        -- Rust afterwards, so it records nothing here and is no second
        -- window of its (account, resource) in this group.
        v_undecided := c.held_now AND c.win_now <> c.win;
        IF NOT v_undecided THEN
            IF c.account = l_account AND c.resource = l_resource AND c.win <> l_window THEN
                RAISE EXCEPTION 'tally_consume_group_dated: %/% is counted over two windows in one group; decide its consumes one at a time',
                    c.account, c.resource
                    USING ERRCODE = 'TL001';
            END IF;
            l_account := c.account;
            l_resource := c.resource;
            l_window := c.win;
        END IF;

        IF c.first_of_period THEN
            IF c.known THEN
                g_settled := (c.settled + COALESCE(c.below, 0))::bigint;
                g_used := (g_settled::numeric + COALESCE(c.above, 0))::bigint;
                g_mark := c.snapshot_xmin::text::bigint;
            ELSE
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
        END IF;
        o_used[c.n] := g_used;
        o_start[c.n] := c.p_start;
        o_end[c.n] := c.p_end;
        o_mark[c.n] := g_mark;
        o_settled[c.n] := g_settled;

        -- Held to a limit in force now over another window: two periods'
        -- `used`, which Rust reads (after `used` above, so that the next
        -- consume of this period finds it read).
        IF v_undecided THEN
            o_outcome[c.n] := 'undecided';
            CONTINUE;
        END IF;

        v_after := g_used::numeric + c.amount;
        IF v_after > 9223372036854775807 OR v_after < -9223372036854775808
           OR (c.lim IS NOT NULL AND c.enforcement = 'hard' AND v_after > c.lim) THEN
            o_outcome[c.n] := 'rejected';
            o_context[c.n] := c.outcome_head || '}';
            CONTINUE;
        END IF;
        IF c.held_now AND c.lim_now IS NOT NULL AND c.enforcement_now = 'hard' AND v_after > c.lim_now THEN
            o_outcome[c.n] := 'rejected_now';
            o_context[c.n] := c.outcome_head_now || '}';
            CONTINUE;
        END IF;
        o_outcome[c.n] := 'recorded';
        -- The limit in force now holds it in this same window and period,
        -- so `used_after` is that limit's too.
        o_context[c.n] := c.outcome_head
            || CASE WHEN c.held_now THEN ',"now":' || c.outcome_head_now || '}' ELSE '' END
            || ',"used_after":' || v_after::text || '}';
        g_used := v_after::bigint;
        r_pos := r_pos || c.n;
    END LOOP;

    IF cardinality(r_pos) > 0 AND n > 1 THEN
        -- A key taken meanwhile fails the group (unique_violation); the
        -- caller then decides each consume alone. Rows go in by (account,
        -- key) in byte order, the order batches insert in (insert_entries),
        -- so a group and a batch sharing keys never wait on each other in a
        -- cycle (0020).
        WITH appended AS (
            INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key, source,
                                 metadata, reverses, consume_outcome)
            SELECT p_accounts[r.pos], p_resources[r.pos], p_amounts[r.pos], p_occurred_at[r.pos], p_recorded_at,
                   p_keys[r.pos], p_sources[r.pos], p_metadata[r.pos]::jsonb, p_reverses[r.pos], o_context[r.pos]
              FROM unnest(r_pos) AS r(pos)
             ORDER BY p_accounts[r.pos] COLLATE "C", p_keys[r.pos] COLLATE "C"
            RETURNING entries.id, entries.account, entries.idempotency_key
        )
        SELECT array_agg(r.pos), array_agg(a.id)
          INTO v_positions, v_ids
          FROM appended AS a
          JOIN unnest(r_pos) AS r(pos) ON a.account = p_accounts[r.pos] AND a.idempotency_key = p_keys[r.pos];
        FOR i IN 1..cardinality(v_positions) LOOP
            o_entry[v_positions[i]] := v_ids[i];
        END LOOP;
    ELSIF cardinality(r_pos) > 0 THEN
        INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key, source,
                             metadata, reverses, consume_outcome)
        VALUES (p_accounts[1], p_resources[1], p_amounts[1], p_occurred_at[1], p_recorded_at,
                p_keys[1], p_sources[1], p_metadata[1]::jsonb, p_reverses[1], o_context[1])
        ON CONFLICT (account, idempotency_key) DO NOTHING
        RETURNING entries.id INTO v_id;
        IF v_id IS NULL THEN
            -- Alone, no other decision counted it: answer 'conflict' (the
            -- caller reports it as such; a retry gets the key's outcome).
            o_outcome[1] := 'conflict';
            o_context[1] := NULL;
        ELSE
            o_entry[1] := v_id;
        END IF;
    END IF;

    RETURN QUERY
        SELECT o.n::int, o.outcome, o.entry_id, o.used, o.context, o.period_start, o.period_end, o.mark, o.settled
          FROM unnest(o_outcome, o_entry, o_used, o_context, o_start, o_end, o_mark, o_settled)
               WITH ORDINALITY AS o(outcome, entry_id, used, context, period_start, period_end, mark, settled, n);
END;
$$;
