-- Operators as people: users who log in with a password (Argon2id) and a
-- TOTP code and get short-lived sessions. Secrets handed out (setup codes,
-- setup tokens, session tokens, recovery codes) carry 256 random bits and
-- are stored as their SHA-256 only. Timestamps are UTC milliseconds.

CREATE TABLE users (
    id TEXT PRIMARY KEY NOT NULL,
    -- What the audit log names the user's calls by; never reused (users
    -- are disabled, not deleted).
    name TEXT NOT NULL UNIQUE,
    -- viewer, publisher, deployer, store-ops or admin.
    role TEXT NOT NULL,
    -- The store labels the user is confined to, as a JSON object; empty
    -- when unscoped.
    scope_json TEXT NOT NULL,
    -- The name of the user (or token) that created it; "setup" for the
    -- first admin.
    created_by TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    -- Set: every login and every live session of the user is refused.
    disabled_at_ms BIGINT,
    -- A PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash); empty
    -- until the user finishes their setup.
    password_hash TEXT NOT NULL,
    -- The TOTP secret, base32 (authenticators need it as is); empty until
    -- set up.
    totp_secret TEXT NOT NULL,
    -- The last TOTP step a code was accepted for: a code of this step or
    -- an earlier one is refused, so a code works once.
    totp_last_step BIGINT NOT NULL,
    -- The one-time setup code (new or reset users); empty once used.
    setup_code_sha256 TEXT NOT NULL,
    -- NULL: it does not expire (the first admin's, in the data dir).
    setup_code_expires_at_ms BIGINT,
    -- The setup under way: a login with the setup code hands out a token
    -- and a fresh TOTP secret, valid for 10 minutes, that CompleteSetup
    -- takes back.
    setup_token_sha256 TEXT NOT NULL,
    setup_totp_secret TEXT NOT NULL,
    setup_expires_at_ms BIGINT,
    -- Failed logins in a row; at login_max_failures the account is locked
    -- until locked_until_ms (and the count starts again).
    failed_logins BIGINT NOT NULL,
    locked_until_ms BIGINT,
    last_login_at_ms BIGINT
);
CREATE INDEX users_setup_token ON users (setup_token_sha256);

-- Single-use codes standing in for a TOTP code (a lost phone).
CREATE TABLE recovery_codes (
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_sha256 TEXT NOT NULL,
    used_at_ms BIGINT,
    PRIMARY KEY (user_id, code_sha256)
);

-- A logged-in user's bearer token. Checked at every call, with the user's
-- row: a disabled user's session ends at its next call.
CREATE TABLE sessions (
    token_sha256 TEXT PRIMARY KEY NOT NULL,
    -- A short id for logs; the token itself is never stored.
    id TEXT NOT NULL,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    -- Logged out, or ended by an admin (disable, reset).
    revoked_at_ms BIGINT,
    -- Where the login came from.
    peer_address TEXT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id, expires_at_ms);

-- The person behind a token: the user whose session (or whose token)
-- created it; empty for tokens made otherwise. Four-eyes approval
-- compares people, so a user's own token cannot approve their rollout.
ALTER TABLE admin_tokens ADD COLUMN owner_id TEXT NOT NULL DEFAULT '';
ALTER TABLE admin_tokens ADD COLUMN owner TEXT NOT NULL DEFAULT '';

-- rollouts.created_by_id and approved_by_id hold, from now on, the id of
-- the person behind the call: the user, the owner of a user's token, or a
-- token of nobody's own id (as every row before users existed holds).

-- "user", "token", "session" (logins and logouts) or "" (unauthenticated).
ALTER TABLE audit_log ADD COLUMN actor_kind TEXT NOT NULL DEFAULT '';
-- For a token: the user who owns it; else empty.
ALTER TABLE audit_log ADD COLUMN actor_owner TEXT NOT NULL DEFAULT '';
-- 1: a row anyone can cause (an unauthenticated call, a failed login for a
-- name no user has): rate-limited, and only the newest are kept.
ALTER TABLE audit_log ADD COLUMN bounded BIGINT NOT NULL DEFAULT 0;
-- Rows before users existed: every authenticated caller was a token.
UPDATE audit_log SET actor_kind = 'token' WHERE actor <> 'unauthenticated';
UPDATE audit_log SET bounded = 1 WHERE actor = 'unauthenticated';
-- `audit list --user`: a user's own calls and logins (by actor), and those
-- of their tokens (by owner).
CREATE INDEX audit_log_owner ON audit_log (actor_owner, seq);
CREATE INDEX audit_log_bounded ON audit_log (bounded, seq);
