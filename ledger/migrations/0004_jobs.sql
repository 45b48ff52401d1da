-- Scheduled checks (jobs/scheduler.py): one row per run, written at start and completed at the end,
-- so a run that crashed or hangs is visible as outcome 'running' with no finished_at.
CREATE TABLE IF NOT EXISTS job_runs (
    id           bigserial PRIMARY KEY,
    job          text        NOT NULL,
    trigger      text        NOT NULL DEFAULT 'schedule',   -- schedule | manual | drill
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    outcome      text        NOT NULL DEFAULT 'running',    -- running | ok | violation | not_available | error
    output       jsonb
);
CREATE INDEX IF NOT EXISTS job_runs_job_started ON job_runs (job, started_at DESC);
