-- Canary analysis: a rollout's policy, each wave's latest judgement, and
-- the signals tills report per minute.

-- The analysis policy (TOML) as the operator gave it; '' for none.
ALTER TABLE rollouts ADD COLUMN analysis_policy TEXT NOT NULL DEFAULT '';

-- observing, pass, fail, inconclusive, or accepted (an operator resumed a
-- rollout the analysis paused); NULL until the wave is judged.
ALTER TABLE rollout_waves ADD COLUMN analysis_verdict TEXT;
-- The judgement (verdict, reason, per-signal evidence) as JSON.
ALTER TABLE rollout_waves ADD COLUMN analysis_json TEXT;
ALTER TABLE rollout_waves ADD COLUMN analysis_at_ms BIGINT;

-- One row per till and minute it reported, kept only for the stores of a
-- wave under analysis, and pruned after a week and a day. counts_json maps
-- signal names to events; values_json maps names to measured values.
CREATE TABLE signal_minutes (
    device_id TEXT NOT NULL,
    minute BIGINT NOT NULL,
    store_id TEXT NOT NULL,
    counts_json TEXT NOT NULL,
    values_json TEXT NOT NULL,
    PRIMARY KEY (device_id, minute)
);
CREATE INDEX signal_minutes_store ON signal_minutes (store_id, minute);
CREATE INDEX signal_minutes_minute ON signal_minutes (minute);
