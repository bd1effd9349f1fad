-- The fractional digits each resource's amounts are stored with. Amounts are
-- integers in the resource's minor unit (hundredths for 2 digits), so a
-- catalog that changes a resource's `decimals` would read every stored
-- amount of it at another scale (review AP: 1.25 listed as 0.125). Tally
-- records the digits it first stores a resource with and refuses to open
-- with a catalog that changes them while the database holds amounts of it.
CREATE TABLE resource_digits (
    resource    TEXT        PRIMARY KEY,
    digits      INTEGER     NOT NULL CHECK (digits BETWEEN 0 AND 9),
    recorded_at TIMESTAMPTZ NOT NULL
);
