-- The transactions running now in this database, by virtual transaction id
-- (locked by each transaction from its start, before it can take an id),
-- with their backend and transaction id (NULL: none yet, a reader so far),
-- of client sessions (autovacuum and other workers write no ledger rows),
-- except this session's and the rollup's: the rollup, known by its advisory
-- lock ($1, a bigint key shown as two 32-bit halves), writes totals, never
-- ledger rows. A session of another role shows no state: taken for a
-- writer ('unknown'), since its transaction id is hidden too. With $2, only
-- those of the virtual transaction ids $2 that still run.
SELECT l.virtualxid,
       l.pid,
       CASE WHEN a.state IS NULL THEN 'unknown' ELSE a.backend_xid::text END AS xid
  FROM pg_locks AS l
  JOIN pg_stat_activity AS a ON a.pid = l.pid
 WHERE l.locktype = 'virtualxid'
   AND l.granted
   AND l.pid <> pg_backend_pid()
   AND ($2::text[] IS NULL OR l.virtualxid = ANY($2))
   AND a.datname = current_database()
   AND a.backend_type = 'client backend'
   AND NOT EXISTS (
         SELECT 1
           FROM pg_locks AS r
          WHERE r.pid = l.pid
            AND r.locktype = 'advisory'
            AND r.granted
            AND r.classid = ($1 >> 32)::oid
            AND r.objid = ($1 & 4294967295)::oid
            AND r.objsubid = 1)
