-- How many times `tally verify --repair` has rewritten folded totals. Each
-- process caches settled sums (store/settled.rs) read partly from those
-- totals; a sum read from a wrong total would keep its error after the
-- repair. The repair adds one here in the transaction that rewrites the
-- totals, and every process reads the count at most once a second and
-- forgets its settled sums when it has moved. One row, always.
CREATE TABLE totals_repairs (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    repairs BIGINT  NOT NULL
);
INSERT INTO totals_repairs (id, repairs) VALUES (1, 0);
