-- Roles: each admin API token holds one role, may expire and may be
-- confined to the stores carrying some labels; the audit log records the
-- role each call was made with. Timestamps are UTC milliseconds.

-- viewer, publisher, deployer, store-ops or admin. Tokens made before
-- roles existed (and the bootstrap token) could do everything: admin.
ALTER TABLE admin_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
-- NULL: never expires (only tokens made before roles existed and the
-- bootstrap token); new tokens always have an expiry.
ALTER TABLE admin_tokens ADD COLUMN expires_at_ms BIGINT;
-- The store label selector the token is confined to, as a JSON object
-- ({"region":"eu"}); empty when unscoped.
ALTER TABLE admin_tokens ADD COLUMN scope_json TEXT NOT NULL DEFAULT '';
-- The name of the token that created it; empty when none did.
ALTER TABLE admin_tokens ADD COLUMN created_by TEXT NOT NULL DEFAULT '';

-- The role the call was made with; empty for unauthenticated calls and
-- rows written before roles existed.
ALTER TABLE audit_log ADD COLUMN role TEXT NOT NULL DEFAULT '';
