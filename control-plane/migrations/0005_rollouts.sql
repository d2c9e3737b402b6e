-- Events, store labels and staged rollouts. Flags are BIGINT 0/1 and
-- timestamps UTC milliseconds, like everywhere else.

-- Every state change, in commit order. `seq` comes from the one row of
-- event_counter, incremented inside the transaction that writes the event:
-- the row stays locked until that transaction ends, so events are numbered
-- in the order their transactions commit, without gaps, and a reader that
-- polls `seq > cursor` never misses one.
CREATE TABLE event_counter (
    id BIGINT PRIMARY KEY NOT NULL,
    last_seq BIGINT NOT NULL
);
INSERT INTO event_counter (id, last_seq) VALUES (1, 0);

CREATE TABLE events (
    seq BIGINT PRIMARY KEY NOT NULL,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    -- Empty when the event is about no rollout (or no device).
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    data_json TEXT NOT NULL
);
CREATE INDEX events_rollout ON events (rollout_id, seq);

CREATE TABLE store_labels (
    store_id TEXT NOT NULL REFERENCES stores (id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (store_id, key)
);
CREATE INDEX store_labels_key_value ON store_labels (key, value);

-- A release (a published bundle) rolled out to a selection of devices in
-- waves. `revision` grows with every change: writers check it, so a change
-- computed from an older read is refused instead of applied twice.
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY NOT NULL,
    bundle_name TEXT NOT NULL,
    bundle_version TEXT NOT NULL,
    bundle_kind TEXT NOT NULL,
    selector_json TEXT NOT NULL,
    strategy_json TEXT NOT NULL,
    -- draft, running, paused, completed, aborted, rolled_back
    state TEXT NOT NULL,
    current_wave BIGINT NOT NULL,
    wave_count BIGINT NOT NULL,
    reason TEXT NOT NULL,
    revision BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    started_at_ms BIGINT,
    finished_at_ms BIGINT,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX rollouts_state ON rollouts (state);
CREATE INDEX rollouts_bundle ON rollouts (bundle_name, state);

-- One row per wave, written when the rollout starts.
CREATE TABLE rollout_waves (
    rollout_id TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    wave BIGINT NOT NULL,
    -- Devices (or stores) ranked by seed fill the waves in order; a wave
    -- holds the seeds up to this one (inclusive), so a device that joins
    -- later lands in the wave its seed falls in. NULL for a wave of named
    -- stores.
    upper_seed BIGINT,
    started_at_ms BIGINT,
    finished_at_ms BIGINT,
    bake_until_ms BIGINT,
    -- Failures accepted by a resume: only failures beyond these pause again.
    failures_acknowledged BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, wave)
);

-- Each selected device: its wave and its state in the rollout.
CREATE TABLE rollout_devices (
    rollout_id TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    store_id TEXT NOT NULL,
    wave BIGINT NOT NULL,
    -- pending, notified, downloading, installing, succeeded, failed,
    -- rolled_back, timed_out
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    -- Set when dispatched: the version of the bundle the device had before
    -- (what a rollback returns it to); empty when it had none.
    previous_version TEXT,
    notified_at_ms BIGINT,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX rollout_devices_state ON rollout_devices (rollout_id, state, wave);
CREATE INDEX rollout_devices_store ON rollout_devices (store_id, state);
CREATE INDEX rollout_devices_device ON rollout_devices (device_id);

-- A desired version that is lower than the installed one on purpose: the
-- rollback of a rollout. Agents install it even though it is a downgrade.
-- Only rollouts set it (on devices' rows); the store's rows have it for
-- symmetry and keep 0.
ALTER TABLE device_desired_bundles ADD COLUMN rollback BIGINT NOT NULL DEFAULT 0;
ALTER TABLE store_desired_bundles ADD COLUMN rollback BIGINT NOT NULL DEFAULT 0;
