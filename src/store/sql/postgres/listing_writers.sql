-- The transactions that have written in this database and not ended, by
-- transaction id (as text: pg_locks shows 32-bit ids), with their backend:
-- each holds an exclusive lock on its own id from its first write. pg_locks
-- shows every session's locks to every role, where pg_stat_activity hides
-- most of other roles' sessions. Prepared transactions hold their locks with
-- no backend (pid NULL). Left out: the rollup and `tally verify --repair`,
-- known by the rollup's advisory lock ($1, a bigint key shown as two 32-bit
-- halves), which write totals, never ledger rows. Not left out: a session running VACUUM or ANALYZE (ANALYZE may
-- follow an insert in the same transaction; autovacuum holds a transaction
-- id only for moments).
SELECT l.transactionid::text AS xid, l.pid
  FROM pg_locks AS l
  JOIN pg_stat_activity AS a ON a.pid = l.pid
 WHERE l.locktype = 'transactionid'
   AND l.mode = 'ExclusiveLock'
   AND l.granted
   AND l.pid <> pg_backend_pid()
   AND a.datname = current_database()
   AND NOT EXISTS (
         SELECT 1
           FROM pg_locks AS r
          WHERE r.pid = l.pid
            AND r.locktype = 'advisory'
            AND r.granted
            AND r.classid = ($1 >> 32)::oid
            AND r.objid = ($1 & 4294967295)::oid
            AND r.objsubid = 1)
UNION ALL
SELECT transaction::text, NULL
  FROM pg_prepared_xacts
 WHERE database = current_database()
