-- Which of the transactions $1 (virtual transaction ids) still run, with
-- their backend and transaction id, as in listing_running.sql.
SELECT l.virtualxid,
       l.pid,
       CASE WHEN a.state IS NULL THEN 'unknown' ELSE a.backend_xid::text END AS xid
  FROM pg_locks AS l
  JOIN pg_stat_activity AS a ON a.pid = l.pid
 WHERE l.locktype = 'virtualxid'
   AND l.virtualxid = ANY($1)
