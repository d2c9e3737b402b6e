-- When the device's first authenticated heartbeat was written. Until then an
-- enrollment retried with the same key and token may re-issue its credential.
ALTER TABLE devices ADD COLUMN first_heartbeat_ms BIGINT;
