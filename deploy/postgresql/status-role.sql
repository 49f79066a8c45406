-- The status app's own database role, killmail_status: it reads what /health, /status, /metrics and GET /api show,
-- and no token. The workers' role can read and write every token; the status app faces the network, so it should
-- not hold that role when it only shows pages.
--
-- Make the role once, as a superuser:   CREATE ROLE killmail_status LOGIN PASSWORD '...';
-- then apply this file to the killmail database as its owner, after schema.sql and again after each change of it:
--   psql "$OWNER_DATABASE_URL" -v ON_ERROR_STOP=1 -f deploy/postgresql/status-role.sql
-- and give the status app DATABASE_URL=postgresql://killmail_status:...@host/killmails.
--
-- The role cannot write. A status app that adds pilots (EVE_CALLBACK_URL: /login, /callback, forget) or queues
-- them (APP_API_TOKEN: POST /api/sync) writes users and login_states: run it with the workers' role, or run two
-- status apps, the public one with this role and EVE_CALLBACK_URL unset.
--
-- It reads users through a view of the same name in its own schema, first on its search_path: every column but
-- the tokens, with refresh_token standing only for whether the grant is live ('live' or NULL), by the rule of
-- db._LIVE_GRANT_SQL, so the page's queries run unchanged.
CREATE SCHEMA IF NOT EXISTS killmail_status;
REVOKE ALL ON SCHEMA killmail_status FROM PUBLIC;

DO $$
DECLARE
    columns TEXT;
BEGIN
    SELECT string_agg(CASE attname
                          WHEN 'access_token' THEN 'NULL::text AS access_token'
                          WHEN 'revoked_token_sha256' THEN 'NULL::text AS revoked_token_sha256'
                          WHEN 'refresh_token' THEN
                              $live$CASE WHEN refresh_token IS NOT NULL AND refresh_token <> ''
                                          AND (revoked_token_sha256 IS NULL OR revoked_token_sha256 <>
                                               encode(sha256(convert_to(refresh_token, 'UTF8')), 'hex'))
                                     THEN 'live' END AS refresh_token$live$
                          ELSE quote_ident(attname) END, ', ' ORDER BY attnum)
    INTO columns
    FROM pg_attribute WHERE attrelid = 'public.users'::regclass AND attnum > 0 AND NOT attisdropped;
    -- Dropped and made again, not replaced: a column added to users may come before another one.
    DROP VIEW IF EXISTS killmail_status.users;
    EXECUTE format('CREATE VIEW killmail_status.users AS SELECT %s FROM public.users', columns);
    EXECUTE format('ALTER ROLE killmail_status IN DATABASE %I SET search_path = killmail_status, public',
                   current_database());
END $$;

GRANT USAGE ON SCHEMA killmail_status, public TO killmail_status;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO killmail_status;
REVOKE ALL ON public.users FROM killmail_status;
GRANT SELECT ON killmail_status.users TO killmail_status;
