-- The audit log and webhooks. Timestamps are UTC milliseconds, like
-- everywhere else.

-- Every mutating AdminService call. `seq` is the previous largest plus one,
-- taken by the insert itself: a row can only be numbered once the one before
-- it has committed, so numbers follow commit order without gaps (an insert
-- that races another for the same number fails and is retried).
-- A row is written when the call is authorized, with result PENDING, and
-- completed with the call's result; a row still PENDING is a call the
-- server did not see finish (it stopped, or crashed).
CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY NOT NULL,
    at_ms BIGINT NOT NULL,
    -- The admin token's name, or "unauthenticated".
    actor TEXT NOT NULL,
    method TEXT NOT NULL,
    target_json TEXT NOT NULL,
    peer_address TEXT NOT NULL,
    -- PENDING, OK, or the gRPC code name (NOT_FOUND, ...).
    result TEXT NOT NULL,
    finished_at_ms BIGINT
);
-- Refused unauthenticated calls are kept up to a bound; older ones are
-- pruned through this index.
CREATE INDEX audit_log_actor ON audit_log (actor, seq);

-- Receivers of events. The secret is the HMAC-SHA256 key deliveries are
-- signed with, so it is stored as is (unlike tokens, which are only
-- verified and stored hashed).
CREATE TABLE webhooks (
    id TEXT PRIMARY KEY NOT NULL,
    url TEXT NOT NULL,
    -- JSON array of event kinds ("rollout.paused") and prefixes
    -- ("rollout.*"); empty: every event.
    events_json TEXT NOT NULL,
    secret TEXT NOT NULL,
    -- The last event stored when the webhook was added: it receives the
    -- events after this one.
    after_event_seq BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL
);

-- One event to deliver to one webhook, and how its attempts went.
-- Deliveries of one rollout to one webhook go out in event order: only the
-- pending row with the lowest event_seq of its (webhook_id, rollout_id) is
-- attempted.
CREATE TABLE webhook_deliveries (
    webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_seq BIGINT NOT NULL,
    event_kind TEXT NOT NULL,
    rollout_id TEXT NOT NULL,
    -- The request body, built once so that every attempt sends (and signs)
    -- the same bytes.
    payload_json TEXT NOT NULL,
    -- pending, delivered, failed (given up)
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    last_http_status BIGINT NOT NULL,
    last_error TEXT NOT NULL,
    last_attempt_at_ms BIGINT NOT NULL,
    next_attempt_at_ms BIGINT NOT NULL,
    -- A dispatcher attempting the delivery holds it until then; another
    -- replica's dispatcher takes it only after (a claim is a conditional
    -- UPDATE on this column).
    claimed_until_ms BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (webhook_id, event_seq)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at_ms);
CREATE INDEX webhook_deliveries_order ON webhook_deliveries (webhook_id, rollout_id, state, event_seq);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_seq);

-- The last event the dispatcher has turned into deliveries (one row). It
-- moves in the same transaction that inserts the deliveries, so a restart
-- neither repeats nor skips an event.
CREATE TABLE webhook_cursor (
    id BIGINT PRIMARY KEY NOT NULL,
    event_seq BIGINT NOT NULL
);
INSERT INTO webhook_cursor (id, event_seq) VALUES (1, 0);
