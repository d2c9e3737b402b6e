-- Rolling upgrades: while replicas are replaced one at a time, binaries of
-- two adjacent versions run on one database. Every migration keeps the
-- schema usable by the binaries of the version before it (it adds tables,
-- indexes, and columns that are nullable or have a default; it never
-- drops, renames or retypes), unless it raises this floor in the same
-- file. A binary that knows fewer migrations than the database has
-- applied runs only if it knows at least `oldest_compatible_migration`.
CREATE TABLE schema_compatibility (
    id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    oldest_compatible_migration BIGINT NOT NULL
);
INSERT INTO schema_compatibility (id, oldest_compatible_migration) VALUES (1, 1);
