-- Logs on demand: an operator's request for a till's logs, waiting for
-- the till's next heartbeat, and the lines the till uploaded for it.
-- Timestamps are UTC milliseconds.

-- state: pending (waiting for the till), uploading, done, expired. A
-- request still pending or uploading at expires_at_ms is expired; a done
-- one keeps its lines until keep_until_ms.
CREATE TABLE log_requests (
    id TEXT PRIMARY KEY NOT NULL,
    device_id TEXT NOT NULL REFERENCES devices (id),
    -- The admin token's name.
    requested_by TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    since_ms BIGINT NOT NULL,
    max_lines BIGINT NOT NULL,
    grep TEXT NOT NULL,
    follow_seconds BIGINT NOT NULL,
    state TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    finished_at_ms BIGINT NOT NULL,
    keep_until_ms BIGINT NOT NULL,
    lines_received BIGINT NOT NULL,
    bytes_received BIGINT NOT NULL,
    -- The largest seq given to a line of this request: an upload that
    -- starts over numbers its lines after the ones it replaces.
    last_seq BIGINT NOT NULL,
    -- Why lines were left out; empty when none were.
    note TEXT NOT NULL
);
-- Heartbeats read the open requests of the fleet through this index.
CREATE INDEX log_requests_state ON log_requests (state, expires_at_ms);
CREATE INDEX log_requests_device ON log_requests (device_id, state);

CREATE TABLE log_lines (
    request_id TEXT NOT NULL REFERENCES log_requests (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    unix_ms BIGINT NOT NULL,
    source TEXT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (request_id, seq)
);
