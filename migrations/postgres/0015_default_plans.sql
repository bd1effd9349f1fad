-- The catalog's default_plan as the processes opening this database found it,
-- oldest first. When it changes, the accounts already known keep the previous
-- default: Tally assigns it to them from the start (account_plans) in the
-- transaction that records the change. "New accounts get default_plan", and a
-- month already billed must not be billed again on another plan.
CREATE TABLE default_plans (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    plan        TEXT        NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL
);
