-- pii-vault's two database roles, run once by a superuser in the vault's database
-- (docker-compose.yml runs it through deploy/postgres/init.sh; psql variables give the passwords):
--
--   psql -v migrator_password=... -v app_password=... -f roles.sql
--
-- piivault_migrator owns the schema and runs `piivault migrate`; it never serves.
-- piivault_app serves: it reads and writes the vault's tables but may only add to the audit trail
-- (no UPDATE or DELETE on audit_events and audit_chain), the README's production grants. Tables
-- do not exist yet when this runs: default privileges grant on each table the migrator creates,
-- and an event trigger takes UPDATE and DELETE back from the append-only ones as they appear.

CREATE ROLE piivault_migrator LOGIN PASSWORD :'migrator_password';
CREATE ROLE piivault_app LOGIN PASSWORD :'app_password';

DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO piivault_migrator', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO piivault_app', current_database());
END
$$;

-- The migrator owns the schema: it creates, alters and drops the vault's tables.
ALTER SCHEMA public OWNER TO piivault_migrator;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO piivault_app;

ALTER DEFAULT PRIVILEGES FOR ROLE piivault_migrator IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO piivault_app;
ALTER DEFAULT PRIVILEGES FOR ROLE piivault_migrator IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO piivault_app;

-- The audit trail is append-only for the serving role, whichever migration creates its tables.
CREATE FUNCTION piivault_append_only_audit() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    created record;
BEGIN
    FOR created IN
        SELECT object_identity FROM pg_event_trigger_ddl_commands()
        WHERE object_type = 'table'
          AND object_identity IN ('public.audit_events', 'public.audit_chain')
    LOOP
        EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON %s FROM piivault_app', created.object_identity);
    END LOOP;
END
$$;

CREATE EVENT TRIGGER piivault_append_only_audit ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
    EXECUTE FUNCTION piivault_append_only_audit();
