-- Usage pages and portal tokens (issue 41, contract section 11).
--
-- A portal token reads one organization (and, when `meters` is set, only those meters) for
-- a browser or an app's backend; it expires after at most 24 hours. Stored like API keys:
-- only a SHA-256 hash of the secret; the prefix finds the row.
CREATE TABLE portal_tokens (
    id           uuid        PRIMARY KEY,
    prefix       text        NOT NULL UNIQUE,
    secret_hash  bytea       NOT NULL,
    org_id       uuid        NOT NULL,
    meters       text[],                 -- NULL: every meter of the organization
    expires_at   timestamptz NOT NULL,
    created_by   text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (expires_at <= created_at + interval '24 hours')
);
CREATE INDEX portal_tokens_expiry ON portal_tokens (expires_at);

-- The recent crossings of an organization (`GET /v1/orgs/{org}/crossings`, the usage page)
-- are read as the reader role like every other per-organization read: row-level security.
GRANT SELECT ON limit_notifications TO metering_reader;
ALTER TABLE limit_notifications ENABLE ROW LEVEL SECURITY;
CREATE POLICY reader_own_org ON limit_notifications FOR SELECT TO metering_reader
    USING (org_id = metering_scoped_org());
CREATE INDEX limit_notifications_by_org ON limit_notifications (org_id, crossed_at DESC);
