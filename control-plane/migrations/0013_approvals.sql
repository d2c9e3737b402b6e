-- Four-eyes approval: a rollout selecting more devices than
-- approval_threshold_devices, or an emergency one, starts only once a
-- caller other than its creator approved it. Timestamps are UTC
-- milliseconds.

-- The id of the admin token that created it (compared with the
-- approver's); empty for rollouts made before approvals existed.
ALTER TABLE rollouts ADD COLUMN created_by_id TEXT NOT NULL DEFAULT '';
-- Devices the selection held when created, or when a start was last
-- refused for want of an approval.
ALTER TABLE rollouts ADD COLUMN selected_devices BIGINT NOT NULL DEFAULT 0;
-- The approving token's name and id; empty until approved.
ALTER TABLE rollouts ADD COLUMN approved_by TEXT NOT NULL DEFAULT '';
ALTER TABLE rollouts ADD COLUMN approved_by_id TEXT NOT NULL DEFAULT '';
ALTER TABLE rollouts ADD COLUMN approved_at_ms BIGINT;
