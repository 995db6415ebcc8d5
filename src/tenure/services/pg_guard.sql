-- The write guard's schema objects, created or brought up to date by every install.
-- Run as one script with no parameters (it contains % signs). See tenure.services.pg_guard.
CREATE SCHEMA IF NOT EXISTS tenure;

CREATE TABLE IF NOT EXISTS tenure.lease (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    token       bigint NOT NULL CHECK (token > 0),
    valid_until timestamptz,
    renewed_at  timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
COMMENT ON TABLE tenure.lease IS
    'tenure.pg_guard: the primary lease of this server; writes to guarded tables are refused past valid_until';

-- valid_until in microseconds since 1970, read by the guard without a
-- snapshot. Never set (is_called = false) means no lease: writes refused.
CREATE SEQUENCE IF NOT EXISTS tenure.lease_until AS bigint MINVALUE 0 NO CYCLE;

CREATE TABLE IF NOT EXISTS tenure.guarded_schemas (
    nsp       regnamespace PRIMARY KEY,
    at_commit boolean NOT NULL DEFAULT false
);

CREATE OR REPLACE FUNCTION tenure.lease_mirror() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    v timestamptz;
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        v := NEW.valid_until;
    END IF;
    -- setval is not transactional: the value counts at once, even before
    -- this transaction commits. NULL, -infinity and anything before 1970 map
    -- to 0 (expired); +infinity to the end of year 9999.
    PERFORM pg_catalog.setval('tenure.lease_until',
        CASE WHEN v IS NULL OR v <= 'epoch'::timestamptz THEN 0
             WHEN v = 'infinity'::timestamptz THEN 253402300799000000
             ELSE pg_catalog.floor(EXTRACT(epoch FROM v) * 1000000)::bigint
        END, true);
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE TRIGGER tenure_lease_mirror
    AFTER INSERT OR UPDATE OR DELETE ON tenure.lease
    FOR EACH ROW EXECUTE FUNCTION tenure.lease_mirror();
CREATE OR REPLACE TRIGGER tenure_lease_mirror_truncate
    AFTER TRUNCATE ON tenure.lease
    FOR EACH STATEMENT EXECUTE FUNCTION tenure.lease_mirror();

CREATE OR REPLACE FUNCTION tenure.guard_refuse(tbl_schema text, tbl text) RETURNS void
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    us  bigint := pg_catalog.pg_sequence_last_value('tenure.lease_until'::pg_catalog.regclass);
    tok bigint;
BEGIN
    SELECT l.token INTO tok FROM tenure.lease l;
    IF us IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '25006',
            MESSAGE = 'tenure: this server holds no primary lease (none renewed since the guard was installed); it is not the primary',
            DETAIL = pg_catalog.format('tenure.pg_guard refused a write to %I.%I at %s', tbl_schema, tbl, pg_catalog.clock_timestamp()),
            HINT = 'Send writes to the current primary.';
    END IF;
    RAISE EXCEPTION USING ERRCODE = '25006',
        MESSAGE = pg_catalog.format('tenure: this server''s primary lease expired at %s (token %s); it is not the primary',
            CASE WHEN us = 0 THEN '-infinity' ELSE pg_catalog.to_timestamp(us / 1000000.0::float8)::text END,
            COALESCE(tok::text, 'none')),
        DETAIL = pg_catalog.format('tenure.pg_guard refused a write to %I.%I at %s', tbl_schema, tbl, pg_catalog.clock_timestamp()),
        HINT = 'Send writes to the current primary.';
END
$fn$;

-- STABLE only so that PL/pgSQL skips the CommandCounterIncrement and fresh
-- snapshot it takes before each expression of a VOLATILE function: the check
-- reads nothing through a snapshot, and it writes nothing.
CREATE OR REPLACE FUNCTION tenure.guard_check() RETURNS trigger
LANGUAGE plpgsql STABLE AS $fn$
BEGIN
    -- The hot path runs for every write statement: one expression, no table
    -- read and no snapshot (a table read costs about twice as much). NULL
    -- (never renewed) fails the test, so writes are refused: fail safe.
    IF pg_catalog.to_timestamp(pg_catalog.pg_sequence_last_value('tenure.lease_until'::pg_catalog.regclass)
                               / 1000000.0::float8) > pg_catalog.clock_timestamp() THEN
        RETURN NULL;
    END IF;
    PERFORM tenure.guard_refuse(TG_TABLE_SCHEMA, TG_TABLE_NAME);
    RETURN NULL;
END
$fn$;

-- Guard rel and every partition below it. Statement triggers are not
-- inherited by partitions, so each gets its own; the constraint trigger
-- is a row trigger, which PostgreSQL clones to partitions by itself.
-- Only ever adds protection.
CREATE OR REPLACE FUNCTION tenure.guard_attach(rel regclass, at_commit boolean) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    part regclass;
BEGIN
    FOR part IN
        SELECT r.relid FROM (SELECT rel AS relid, 0 AS level
                             UNION SELECT t.relid, t.level FROM pg_catalog.pg_partition_tree(rel) t) r
        ORDER BY r.level
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g WHERE g.tgrelid = part AND g.tgname = 'tenure_guard'
                       AND g.tgfoid = 'tenure.guard_check()'::regprocedure) THEN
            EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER tenure_guard '
                'BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s '
                'FOR EACH STATEMENT EXECUTE FUNCTION tenure.guard_check()', part);
        END IF;
        IF at_commit AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                                     WHERE g.tgrelid = part AND g.tgname = 'tenure_guard_commit') THEN
            EXECUTE pg_catalog.format('CREATE CONSTRAINT TRIGGER tenure_guard_commit '
                'AFTER INSERT OR UPDATE OR DELETE ON %s DEFERRABLE INITIALLY DEFERRED '
                'FOR EACH ROW EXECUTE FUNCTION tenure.guard_check()', part);
        END IF;
    END LOOP;
END
$fn$;

CREATE OR REPLACE FUNCTION tenure.guard_detach(rel regclass) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    part regclass;
BEGIN
    FOR part IN
        SELECT r.relid FROM (SELECT rel AS relid, 0 AS level
                             UNION SELECT t.relid, t.level FROM pg_catalog.pg_partition_tree(rel) t) r
        ORDER BY r.level
    LOOP
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g WHERE g.tgrelid = part AND g.tgname = 'tenure_guard'
                   AND g.tgfoid = 'tenure.guard_check()'::regprocedure) THEN
            EXECUTE pg_catalog.format('DROP TRIGGER tenure_guard ON %s', part);
        END IF;
        -- A partition's clone goes with its parent's trigger (dropped first:
        -- the tree is walked top down) and cannot be dropped on its own.
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g WHERE g.tgrelid = part AND g.tgname = 'tenure_guard_commit'
                   AND g.tgfoid = 'tenure.guard_check()'::regprocedure AND g.tgparentid = 0) THEN
            EXECUTE pg_catalog.format('DROP TRIGGER tenure_guard_commit ON %s', part);
        END IF;
    END LOOP;
END
$fn$;

-- Called by the event trigger for each table created or altered: guard it
-- if it lies in a guarded schema, or if it or a partition ancestor already
-- carries the guard (a new or attached partition of a guarded table).
CREATE OR REPLACE FUNCTION tenure.guard_cover(rel oid) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    kind    "char";
    rel_nsp oid;
    persist "char";
    ac      boolean;
    sac     boolean;
BEGIN
    SELECT c.relkind, c.relnamespace, c.relpersistence INTO kind, rel_nsp, persist
      FROM pg_catalog.pg_class c WHERE c.oid = rel;
    IF NOT FOUND OR kind NOT IN ('r', 'p') OR persist = 't' OR rel_nsp = 'tenure'::regnamespace THEN
        RETURN;
    END IF;
    -- NULL: neither the table nor a partition ancestor carries the guard.
    SELECT pg_catalog.bool_or(g.tgname = 'tenure_guard_commit') INTO ac
      FROM (SELECT rel::regclass AS relid UNION SELECT a.relid FROM pg_catalog.pg_partition_ancestors(rel) a) r
      JOIN pg_catalog.pg_trigger g ON g.tgrelid = r.relid
     WHERE g.tgfoid = 'tenure.guard_check()'::regprocedure;
    SELECT s.at_commit INTO sac FROM tenure.guarded_schemas s WHERE s.nsp = rel_nsp;
    IF FOUND THEN
        ac := COALESCE(ac, false) OR sac;
    END IF;
    IF ac IS NOT NULL THEN
        PERFORM tenure.guard_attach(rel::regclass, ac);
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION tenure.guard_ddl() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT d.objid FROM pg_catalog.pg_event_trigger_ddl_commands() d
         WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.object_type = 'table'
    LOOP
        PERFORM tenure.guard_cover(r.objid);
    END LOOP;
END
$fn$;

-- Any role that writes a guarded table runs the check as itself.
GRANT USAGE ON SCHEMA tenure TO PUBLIC;
GRANT SELECT ON tenure.lease, tenure.guarded_schemas TO PUBLIC;
GRANT SELECT ON SEQUENCE tenure.lease_until TO PUBLIC;
