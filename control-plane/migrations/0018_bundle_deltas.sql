-- Deltas are published beside the bundles they rebuild: a row of `bundles`
-- whose `delta_from` names the version it applies to (empty for a bundle).
-- `name` and `version` are those of the bundle it rebuilds, so a till may
-- fetch a delta exactly when it may fetch that bundle; rollouts and
-- assignments name bundles by `<name>/<version>`, which a delta's target
-- (`<name>/<version>/from-<base>.delta`) never is.
ALTER TABLE bundles ADD COLUMN delta_from TEXT NOT NULL DEFAULT '';
