-- Stores, enrollment tokens, devices and their labels, admin API tokens.
-- Timestamps are UTC milliseconds since the Unix epoch.

CREATE TABLE stores (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    time_zone TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY NOT NULL,
    store_id TEXT NOT NULL REFERENCES stores (id),
    secret_sha256 TEXT NOT NULL UNIQUE,
    uses_total BIGINT NOT NULL,
    uses_remaining BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX enrollment_tokens_store ON enrollment_tokens (store_id);

CREATE TABLE devices (
    id TEXT PRIMARY KEY NOT NULL,
    store_id TEXT NOT NULL REFERENCES stores (id),
    public_key TEXT NOT NULL UNIQUE,
    credential_sha256 TEXT NOT NULL,
    hardware_model TEXT NOT NULL,
    serial_number TEXT NOT NULL,
    enrollment_token_id TEXT NOT NULL,
    enrolled_at_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    heartbeat_interval_seconds BIGINT NOT NULL,
    agent_version TEXT NOT NULL,
    installed_bundles_json TEXT NOT NULL,
    agent_uptime_seconds BIGINT NOT NULL,
    uptime_seconds BIGINT NOT NULL,
    disk_free_bytes BIGINT NOT NULL,
    disk_total_bytes BIGINT NOT NULL,
    memory_total_bytes BIGINT NOT NULL,
    memory_available_bytes BIGINT NOT NULL,
    peripherals_json TEXT NOT NULL
);
CREATE INDEX devices_store ON devices (store_id, id);

CREATE TABLE device_labels (
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (device_id, key)
);
CREATE INDEX device_labels_key_value ON device_labels (key, value);

CREATE TABLE admin_tokens (
    id TEXT PRIMARY KEY NOT NULL,
    secret_sha256 TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT
);
