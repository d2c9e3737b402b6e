-- Desired state (written by ops and, later, the rollout engine) and reported
-- bundle state (written by agents). Flags are BIGINT 0/1, like every integer
-- here, so both databases read them the same way.

-- A store's daily maintenance window in its own time zone; NULL: any time.
ALTER TABLE stores ADD COLUMN maintenance_start_minute BIGINT;
ALTER TABLE stores ADD COLUMN maintenance_duration_minutes BIGINT;

-- The version of a bundle every device of a store should have, including
-- devices enrolled later.
CREATE TABLE store_desired_bundles (
    store_id TEXT NOT NULL REFERENCES stores (id),
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    kind TEXT NOT NULL,
    download_ahead BIGINT NOT NULL,
    emergency BIGINT NOT NULL,
    assigned_at_ms BIGINT NOT NULL,
    PRIMARY KEY (store_id, name)
);

-- The version of a bundle one device should have; it beats its store's row
-- for the same bundle name.
CREATE TABLE device_desired_bundles (
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    kind TEXT NOT NULL,
    download_ahead BIGINT NOT NULL,
    emergency BIGINT NOT NULL,
    assigned_at_ms BIGINT NOT NULL,
    PRIMARY KEY (device_id, name)
);

-- What each device last reported per bundle. updated_at_ms is the agent's
-- time of the change: a report older than the stored one is ignored.
CREATE TABLE device_bundle_status (
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    active_version TEXT NOT NULL,
    target_version TEXT NOT NULL,
    phase TEXT NOT NULL,
    bytes_done BIGINT NOT NULL,
    bytes_total BIGINT NOT NULL,
    error TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (device_id, name)
);
