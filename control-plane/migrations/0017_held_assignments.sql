-- Four-eyes approval of emergency assignments: `posfleet device assign
-- --emergency` installs at once, outside the maintenance window, so it is
-- held here until a second person approves it; approving it applies it (in
-- the same transaction). Timestamps are UTC milliseconds.
CREATE TABLE held_assignments (
    id TEXT PRIMARY KEY NOT NULL,
    -- The device assigned to; empty when the whole store is.
    device_id TEXT NOT NULL,
    -- The store assigned to, or the device's store.
    store_id TEXT NOT NULL,
    bundle_name TEXT NOT NULL,
    bundle_version TEXT NOT NULL,
    bundle_kind TEXT NOT NULL,
    download_ahead BIGINT NOT NULL,
    -- `awaiting-approval`, `approved`, `cancelled`; an awaiting one past
    -- `expires_at_ms` has lapsed.
    state TEXT NOT NULL,
    -- Who asked for it: the name the audit log records and the person's id
    -- (a user's, or a token's owner's), compared with the approver's.
    requested_by TEXT NOT NULL,
    requested_by_id TEXT NOT NULL,
    requested_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    -- Who approved or cancelled it, and when; empty until then.
    decided_by TEXT NOT NULL DEFAULT '',
    decided_at_ms BIGINT,
    -- Devices the approval assigned it to.
    devices_assigned BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX held_assignments_by_state ON held_assignments (state, requested_at_ms);
