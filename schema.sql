-- The one schema of the killmail sync worker. Idempotent: applying it again changes nothing and loses nothing.

-- Applying it again must not stop running workers: ALTER TABLE and CREATE INDEX lock their table (against every
-- reader, or every writer) before IF [NOT] EXISTS finds that there is nothing to do, and wait behind any open
-- transaction that writes to it. So a change to an existing table goes through one of these procedures, which
-- make it only when the catalog says it is missing. They live in this session's pg_temp: they leave nothing behind.
CREATE OR REPLACE PROCEDURE pg_temp.add_column(p_table REGCLASS, p_column NAME, p_definition TEXT)
LANGUAGE plpgsql AS $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = p_table AND attname = p_column AND NOT attisdropped)
    THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', p_table, p_column, p_definition);
    END IF;
END $$;
CREATE OR REPLACE PROCEDURE pg_temp.drop_column(p_table REGCLASS, p_column NAME)
LANGUAGE plpgsql AS $$ BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = p_table AND attname = p_column AND NOT attisdropped) THEN
        EXECUTE format('ALTER TABLE %s DROP COLUMN %I', p_table, p_column);
    END IF;
END $$;
CREATE OR REPLACE PROCEDURE pg_temp.drop_constraint(p_table REGCLASS, p_constraint NAME)
LANGUAGE plpgsql AS $$ BEGIN
    IF EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = p_table AND conname = p_constraint) THEN
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', p_table, p_constraint);
    END IF;
END $$;
CREATE OR REPLACE PROCEDURE pg_temp.create_index(p_index NAME, p_definition TEXT)
LANGUAGE plpgsql AS $$ BEGIN
    IF to_regclass(quote_ident(p_index)) IS NULL THEN
        EXECUTE format('CREATE INDEX %I ON %s', p_index, p_definition);
    END IF;
END $$;

-- Written by the web app at SSO login (the first five columns); the worker adds its own state with defaults,
-- so a row with only the web app's columns is a valid user.
CREATE TABLE IF NOT EXISTS users (
    character_id   BIGINT UNIQUE NOT NULL,
    character_name TEXT,
    access_token   TEXT,
    refresh_token  TEXT,
    expires_at     TIMESTAMPTZ
);
CALL pg_temp.add_column('users', 'corporation_id', 'BIGINT');
CALL pg_temp.add_column('users', 'scopes', 'TEXT');
CALL pg_temp.add_column('users', 'is_director', 'BOOLEAN');
-- sha256 of the refresh token that SSO answered invalid_grant for: the user needs a new login until the web
-- app writes a different refresh token (no trigger and no cooperation from the web app needed).
CALL pg_temp.add_column('users', 'revoked_token_sha256', 'TEXT');
CALL pg_temp.add_column('users', 'token_error', 'TEXT');
CALL pg_temp.add_column('users', 'sync_interval_seconds', 'INTEGER');
CALL pg_temp.add_column('users', 'queued_at', 'TIMESTAMPTZ');
-- The producer session (its PostgreSQL backend pid) that claimed the user, until the broker confirms the job:
-- a claim whose session is gone was never confirmed, and the next run frees it (db.release_unconfirmed).
CALL pg_temp.add_column('users', 'claimed_by', 'INTEGER');
CALL pg_temp.add_column('users', 'last_sync_at', 'TIMESTAMPTZ');
CALL pg_temp.add_column('users', 'last_sync_status', 'TEXT');
CALL pg_temp.add_column('users', 'last_new_killmail_at', 'TIMESTAMPTZ');
CALL pg_temp.add_column('users', 'list_etag', 'TEXT');
CALL pg_temp.add_column('users', 'list_expires_at', 'TIMESTAMPTZ');
CALL pg_temp.add_column('users', 'created_at', 'TIMESTAMPTZ NOT NULL DEFAULT now()');
CALL pg_temp.add_column('users', 'corporation_checked_at', 'TIMESTAMPTZ');
-- When is_director was learned (its corporation's list answered, or refused): a pilot found without the role
-- is asked again a week later.
CALL pg_temp.add_column('users', 'director_checked_at', 'TIMESTAMPTZ');
-- When the pilot last pressed "Sync now" on its page (pilot_page.py): once a minute at most, whichever process
-- of the web app answers.
CALL pg_temp.add_column('users', 'sync_requested_at', 'TIMESTAMPTZ');

-- Logins under way (login.py): the hash of the state sent to EVE SSO and the PKCE verifier that goes with it.
-- A state is used up by the callback that brings it back; rows older than ten minutes are deleted by the next login.
-- /login needs no password: the client's address bounds the logins one client has under way, and the table is
-- capped (login.py); created_at is indexed for both counts and for the deletion.
CREATE TABLE IF NOT EXISTS login_states (
    state_sha256  TEXT PRIMARY KEY,
    code_verifier TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    client        TEXT NOT NULL DEFAULT ''
);
CALL pg_temp.add_column('login_states', 'client', 'TEXT NOT NULL DEFAULT ''''');
CALL pg_temp.create_index('login_states_created', 'login_states (created_at)');
CALL pg_temp.create_index('login_states_client', 'login_states (client, created_at)');

-- Corporations whose killmails are synced through a member with the corporation scope and the Director role.
CREATE TABLE IF NOT EXISTS corporations (
    corporation_id        BIGINT PRIMARY KEY,
    director_character_id BIGINT,
    queued_at             TIMESTAMPTZ,
    claimed_by            INTEGER,      -- as users.claimed_by
    last_sync_at          TIMESTAMPTZ,
    last_sync_status      TEXT,
    last_new_killmail_at  TIMESTAMPTZ,
    list_etag             TEXT,
    list_expires_at       TIMESTAMPTZ,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now()
);
CALL pg_temp.add_column('corporations', 'claimed_by', 'INTEGER');

-- Stage one: every (id, hash) pair a list returned. A reference without a row in killmails is pending;
-- attempts/last_error/next_attempt_at keep the failures of its detail fetch; claimed_until and claimed_by (the
-- claiming PostgreSQL backend) keep two processes from fetching the same detail at once.
CREATE TABLE IF NOT EXISTS killmail_refs (
    killmail_id     BIGINT PRIMARY KEY,
    killmail_hash   TEXT NOT NULL,
    first_seen_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at TIMESTAMPTZ,
    claimed_until   TIMESTAMPTZ
);
CALL pg_temp.add_column('killmail_refs', 'claimed_by', 'INTEGER');

-- Which pilot's list (kills and losses) a killmail came from.
CREATE TABLE IF NOT EXISTS character_killmails (
    character_id BIGINT NOT NULL,
    killmail_id  BIGINT NOT NULL,
    PRIMARY KEY (character_id, killmail_id)
);
CALL pg_temp.create_index('character_killmails_killmail', 'character_killmails (killmail_id)');

-- Which corporation's list a killmail came from.
CREATE TABLE IF NOT EXISTS corporation_killmails (
    corporation_id BIGINT NOT NULL,
    killmail_id    BIGINT NOT NULL,
    PRIMARY KEY (corporation_id, killmail_id)
);
CALL pg_temp.create_index('corporation_killmails_killmail', 'corporation_killmails (killmail_id)');

-- Stage two: one row per killmail, shared by every pilot who saw it.
CREATE TABLE IF NOT EXISTS killmails (
    killmail_id           BIGINT PRIMARY KEY,
    killmail_hash         TEXT NOT NULL,
    killmail_time         TIMESTAMPTZ NOT NULL,
    solar_system_id       BIGINT NOT NULL,
    moon_id               BIGINT,
    war_id                BIGINT,
    victim_character_id   BIGINT,
    victim_corporation_id BIGINT,
    victim_alliance_id    BIGINT,
    victim_faction_id     BIGINT,
    victim_ship_type_id   BIGINT NOT NULL,
    victim_damage_taken   BIGINT NOT NULL,
    position_x            DOUBLE PRECISION,
    position_y            DOUBLE PRECISION,
    position_z            DOUBLE PRECISION,
    raw                   JSONB NOT NULL,
    stored_at             TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- A raw body (a few kB) is compressed on insert: lz4 costs the database far less CPU per killmail than PostgreSQL's
-- default pglz, for somewhat more space, and a backlog is bound by CPU, not disk. A server without lz4 keeps pglz.
DO $$ BEGIN
    IF (SELECT attcompression FROM pg_attribute WHERE attrelid = 'killmails'::regclass AND attname = 'raw') <> 'l'
    THEN
        ALTER TABLE killmails ALTER COLUMN raw SET COMPRESSION lz4;
    END IF;
EXCEPTION WHEN feature_not_supported OR syntax_error OR undefined_column THEN  -- no lz4, or a server before 14
    RAISE NOTICE 'lz4 is not available here: killmails.raw keeps the default compression';
END $$;
CALL pg_temp.create_index('killmails_time', 'killmails (killmail_time)');
-- ISK values (values.py's rule), computed when a killmail is saved; null until prices are known, when the
-- workers' next jobs fill them in (values.value_missing, which finds them by killmails_unvalued).
CALL pg_temp.add_column('killmails', 'destroyed_value', 'NUMERIC');
CALL pg_temp.add_column('killmails', 'dropped_value', 'NUMERIC');
CALL pg_temp.add_column('killmails', 'total_value', 'NUMERIC');
CALL pg_temp.create_index('killmails_unvalued', 'killmails (killmail_id) WHERE total_value IS NULL');
CALL pg_temp.create_index('killmails_stored_at', 'killmails (stored_at)');

-- Attackers and items are written only in the transaction that inserts their killmail (db.save_killmails), so
-- they never point at a missing one; a foreign key would check that again per row and halve the ingest rate.

-- One row per attacker entry, in ESI's order: identical NPC attackers stay separate rows.
CREATE TABLE IF NOT EXISTS attackers (
    killmail_id     BIGINT NOT NULL,
    attacker_index  INTEGER NOT NULL,
    character_id    BIGINT,
    corporation_id  BIGINT,
    alliance_id     BIGINT,
    faction_id      BIGINT,
    ship_type_id    BIGINT,
    weapon_type_id  BIGINT,
    damage_done     BIGINT NOT NULL,
    final_blow      BOOLEAN NOT NULL,
    security_status DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (killmail_id, attacker_index)
);
CALL pg_temp.create_index('attackers_character', 'attackers (character_id) WHERE character_id IS NOT NULL');

-- One row per item entry, in ESI's order; items inside a container point at the container's item_index.
-- The same type may stand twice under one flag (destroyed and dropped), so items are keyed on position.
CREATE TABLE IF NOT EXISTS killmail_items (
    killmail_id        BIGINT NOT NULL,
    item_index         INTEGER NOT NULL,
    parent_index       INTEGER,
    flag               INTEGER NOT NULL,
    item_type_id       BIGINT NOT NULL,
    singleton          INTEGER NOT NULL,
    quantity_destroyed BIGINT,
    quantity_dropped   BIGINT,
    PRIMARY KEY (killmail_id, item_index)
);

-- Names of the ids the API and the pages show (characters, corporations, alliances, factions, types, systems),
-- from ESI's POST /universe/names/. An id ESI could not resolve has no name and is not asked again until
-- unknown_until.
CREATE TABLE IF NOT EXISTS names (
    id            BIGINT PRIMARY KEY,
    category      TEXT,
    name          TEXT,
    resolved_at   TIMESTAMPTZ,
    unknown_until TIMESTAMPTZ
);

-- The region of each system a killmail was in (ESI's GET /universe/systems/{id}/ then /constellations/{id}/),
-- looked up once: systems never move. The region's name is in names, as every other name. No region: ESI knows
-- none for that system (it answered 404).
CREATE TABLE IF NOT EXISTS system_regions (
    system_id  BIGINT PRIMARY KEY,
    region_id  BIGINT,
    located_at TIMESTAMPTZ NOT NULL
);

-- ESI's GET /markets/prices/, one row per type; values.py prices killmails with them.
CREATE TABLE IF NOT EXISTS market_prices (
    type_id        INTEGER PRIMARY KEY,
    average_price  NUMERIC,
    adjusted_price NUMERIC,
    fetched_at     TIMESTAMPTZ NOT NULL
);

-- The ETag and expiry of public ESI routes read by every process ('markets/prices').
CREATE TABLE IF NOT EXISTS esi_cache (
    key        TEXT PRIMARY KEY,
    etag       TEXT,
    expires_at TIMESTAMPTZ
);

-- The job each worker process has in hand, written every 10 s while it has one (killmail_worker.JobReporter), so
-- that /status, /metrics and /health?deep=1 see a stalled job. A row not seen for a minute is a dead process's.
CREATE UNLOGGED TABLE IF NOT EXISTS worker_jobs (
    worker       TEXT PRIMARY KEY,      -- host:pid
    character_id BIGINT NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL,
    progress_at  TIMESTAMPTZ NOT NULL,  -- its last answer from ESI, saved batch or wait decreed by the ledger
    seen_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Claims older than the stale-claim limit, counted for /metrics without a pass over every pilot.
CALL pg_temp.create_index('users_queued', 'users (queued_at) WHERE queued_at IS NOT NULL');
CALL pg_temp.create_index('corporations_queued', 'corporations (queued_at) WHERE queued_at IS NOT NULL');

-- One row per job run; the status page reads it.
CREATE TABLE IF NOT EXISTS sync_runs (
    id             BIGSERIAL PRIMARY KEY,
    character_id   BIGINT NOT NULL,
    corporation_id BIGINT,
    kind           TEXT NOT NULL DEFAULT 'character',
    started_at     TIMESTAMPTZ NOT NULL,
    finished_at    TIMESTAMPTZ,
    status         TEXT NOT NULL,
    listed         INTEGER NOT NULL DEFAULT 0,
    new            INTEGER NOT NULL DEFAULT 0,
    saved          INTEGER NOT NULL DEFAULT 0,
    skipped        INTEGER NOT NULL DEFAULT 0,
    failed         INTEGER NOT NULL DEFAULT 0,
    esi_calls      INTEGER NOT NULL DEFAULT 0,
    attempt        INTEGER NOT NULL DEFAULT 1,
    worker         TEXT,
    error          TEXT
);
CALL pg_temp.create_index('sync_runs_finished', 'sync_runs (finished_at DESC)');
CALL pg_temp.create_index('sync_runs_character', 'sync_runs (character_id, started_at DESC)');

-- ESI's limits: the rule. limits.py states it with its numbers, each beside the line of ESI.md it follows (its
-- section "The rule"); this section is the ledger that applies it for every process on every host, on the
-- database's clock:
-- - A rate-limit bucket ('killmail@<egress>', 'char-killmail:<character id>', ...) holds `limit` tokens a
--   floating `window`: what an answer cost is booked in esi_spent in the whole second after it, and comes back
--   one window after that second, never before ESI gives it back.
-- - A call takes before it goes (esi_take_tokens) and settles when answered (esi_settle). In flight it holds a
--   200's cost in esi_in_flight and keeps room beside it for a dearer answer; it goes only when what is spent,
--   what is in flight and its own cost leave the bucket's floor (what a backlog leaves to fresh calls) and, once
--   ESI counts spends beyond the ledger (other apps behind the IP, booked as `other`), a reserve. A process may
--   take several calls' worth in one row (a lease) and settle their answers together, each booked in the second
--   after its own answer.
-- - The error limit is a bucket of the same ledger ('error-limit@<egress>', a token per error answer): each call
--   in flight holds a slot, one error it may turn into (esi_take_errors), under a floor of half the budget once
--   errors come and a small one after a window without any.
-- - A pause (420, 429) is a row of esi_limits that every process reads.

-- ESI's limits as every process on every host last saw them, one row per bucket key ('error-limit',
-- 'killmail', 'char-killmail' for the limit every character's list bucket has, ...). paused_until stops every
-- caller of that bucket (a 420 or a 429); the spending itself is counted in esi_spent and esi_in_flight.
CREATE TABLE IF NOT EXISTS esi_limits (
    bucket         TEXT PRIMARY KEY,
    limit_tokens   INTEGER,
    window_seconds INTEGER,
    remaining      INTEGER,
    paused_until   TIMESTAMPTZ,
    last_status    INTEGER,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Each process reads every per-character bucket paused beyond now once a second (db.limit_state), beside the
-- buckets it names: without this index that OR is a pass over a row per pilot, with it a look at the few paused.
CALL pg_temp.create_index('esi_limits_paused', 'esi_limits (paused_until) WHERE paused_until IS NOT NULL');
-- The status page reads the buckets every caller shares and the groups' own rows (a handful) apart from the
-- per-character ones (up to a row per pilot): db.esi_limit_buckets names this predicate word for word
-- (db._SHARED_BUCKET_SQL).
CALL pg_temp.create_index('esi_limits_shared', 'esi_limits (bucket) '
                          'WHERE (bucket NOT LIKE ''char-killmail:%'' AND bucket NOT LIKE ''corp-killmail:%'')');

-- The ledger of ESI's floating windows: what was spent of each bucket ('killmail@<egress>',
-- 'char-killmail:<character id>', 'error-limit@<egress>' where a token is an error answer) in each whole second,
-- rounded up, so a second's tokens come back one window after it, never before ESI gives them back. `own` is
-- what this app's answers cost; `other` what ESI's own count showed beyond it (other apps behind the same IP).
CREATE TABLE IF NOT EXISTS esi_spent (
    bucket TEXT NOT NULL,
    second TIMESTAMPTZ NOT NULL,
    own    INTEGER NOT NULL DEFAULT 0,
    other  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket, second)
);

-- Calls sent and not yet answered, each holding what its answer may cost. A row left by a killed process (its
-- session gone) stops counting when a bucket is short: its tokens are spent as sent (ESI charged them on
-- arrival), its possible error dropped (a real one shows in ESI's count); or at the latest when its hold ends. Rows live for one call: unlogged (a database crash ends every call anyway) and
-- vacuumed often, so that counting them never walks thousands of dead rows.
CREATE UNLOGGED TABLE IF NOT EXISTS esi_in_flight (
    id          BIGSERIAL PRIMARY KEY,
    bucket      TEXT NOT NULL,
    sent_at     TIMESTAMPTZ NOT NULL,
    tokens      INTEGER NOT NULL,
    backend_pid INTEGER NOT NULL DEFAULT pg_backend_pid()  -- the taking process's session: gone when it died
);
CALL pg_temp.add_column('esi_in_flight', 'backend_pid', 'INTEGER NOT NULL DEFAULT pg_backend_pid()');
CALL pg_temp.create_index('esi_in_flight_bucket', 'esi_in_flight (bucket, sent_at)');
DO $$ BEGIN
    IF NOT coalesce((SELECT reloptions FROM pg_class WHERE oid = 'esi_in_flight'::regclass), '{}')
           @> '{autovacuum_vacuum_scale_factor=0,autovacuum_vacuum_threshold=1000}' THEN
        ALTER TABLE esi_in_flight SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);
    END IF;
END $$;

-- Take what `p_calls` calls may cost at most (a lease of several, one row), at least one, from one bucket of the
-- ledger (ESI's limits, the rule above): the row's id and how many calls it holds; or no row, no calls and the
-- seconds to wait, until enough spent tokens come back, or a short `p_poll` while the answers of calls in flight
-- would give enough back (`p_frees` each). The arithmetic both takes share, esi_take_tokens and esi_take_errors,
-- which name its parameters for their bucket. A call holds `p_cost` while in flight and keeps `p_headroom` of
-- room beside it (an answer dearer than its cost). It fits when spent + in flight + its cost + the floor (+ the
-- reserve once other apps were seen spending) is within the limit; the floor is `p_calm_floor` while the bucket
-- has no row in the window (nothing spent, and ESI counted nothing: see esi_settle), `p_floor` once it has one.
-- A row in flight counts for `p_hold` seconds at most (a killed process's); a lease hands its calls out for
-- `p_life` seconds after it was taken. The check and the take are one step under the bucket's advisory lock, for
-- every process on every host, and one round trip. Times are the database's clock, one for every host, unless
-- the caller gives one. Both takes and esi_settle read a bucket's rows by key and never the whole table: a
-- session keeps its plans until the table is analyzed again, and one made while the ledger held a few rows would
-- otherwise read all of them on every call once it holds a row per pilot (enable_seqscan off, for the function).
CREATE OR REPLACE FUNCTION esi_take_calls(p_now TIMESTAMPTZ, p_bucket TEXT, p_calls INTEGER, p_cost INTEGER,
                                          p_headroom INTEGER, p_frees INTEGER, p_limit INTEGER, p_window INTEGER,
                                          p_hold INTEGER, p_life INTEGER, p_floor INTEGER, p_calm_floor INTEGER,
                                          p_reserve INTEGER, p_charged BOOLEAN, p_poll DOUBLE PRECISION,
                                          OUT id BIGINT, OUT calls INTEGER, OUT wait DOUBLE PRECISION)
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    now_ TIMESTAMPTZ;
    since TIMESTAMPTZ;
    spent_own BIGINT;
    spent_other BIGINT;
    spent_rows BIGINT;
    flying BIGINT;
    flying_calls BIGINT;
    excess BIGINT;
    back_at TIMESTAMPTZ;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('esi:' || p_bucket, 0));
    now_ := coalesce(p_now, clock_timestamp());
    since := now_ - make_interval(secs => p_window);
    DELETE FROM esi_spent WHERE bucket = p_bucket AND second <= since;
    DELETE FROM esi_in_flight WHERE bucket = p_bucket AND sent_at <= now_ - make_interval(secs => p_hold);
    FOR pass IN 1 .. 2 LOOP
        SELECT coalesce(sum(own), 0), coalesce(sum(other), 0), count(*) INTO spent_own, spent_other, spent_rows
            FROM esi_spent WHERE bucket = p_bucket;
        SELECT coalesce(sum(tokens), 0) INTO flying FROM esi_in_flight WHERE bucket = p_bucket;
        flying_calls := flying / p_cost;  -- a lease's row holds several calls
        excess := spent_own + spent_other + flying + p_headroom * flying_calls + p_cost
                  + CASE WHEN spent_rows > 0 THEN p_floor ELSE p_calm_floor END
                  + CASE WHEN spent_other > 0 THEN p_reserve ELSE 0 END - p_limit;
        EXIT WHEN excess <= 0 OR flying_calls = 0 OR pass = 2;
        -- Short: the calls of processes that died (their session is gone) hold nothing more in flight. What
        -- ESI charged on arrival (`p_charged`) stays spent from the second the last of them may have been sent.
        WITH dead AS (
            DELETE FROM esi_in_flight f WHERE f.bucket = p_bucket
                AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = f.backend_pid)
            RETURNING f.sent_at + make_interval(secs => p_life) AS sent_by, f.tokens)
        INSERT INTO esi_spent (bucket, second, own)
            SELECT p_bucket, to_timestamp(ceil(extract(epoch FROM d.sent_by))), sum(d.tokens)
            FROM dead d WHERE p_charged AND d.sent_by > since GROUP BY 2
        ON CONFLICT (bucket, second) DO UPDATE SET own = esi_spent.own + EXCLUDED.own;
    END LOOP;
    IF excess <= 0 THEN
        -- The call, and as many more as fit beside it, each with its headroom.
        calls := least(1 + (-excess) / (p_cost + p_headroom), greatest(p_calls, 1));
        wait := 0;
        INSERT INTO esi_in_flight (bucket, sent_at, tokens) VALUES (p_bucket, now_, p_cost * calls)
        RETURNING esi_in_flight.id INTO id;
        RETURN;
    END IF;
    calls := 0;
    IF flying_calls > 0 AND excess <= p_frees * flying_calls THEN
        wait := p_poll;  -- the answers in flight are about to give enough back
        RETURN;
    END IF;
    -- The oldest seconds come back first: the one by which `excess` tokens are back.
    SELECT s.second INTO back_at FROM (
        SELECT second, sum(own + other) OVER (ORDER BY second) AS back FROM esi_spent WHERE bucket = p_bucket) s
    WHERE s.back >= excess ORDER BY s.second LIMIT 1;
    wait := CASE WHEN back_at IS NOT NULL THEN extract(epoch FROM back_at - since)
                 WHEN flying_calls > 0 THEN p_poll  -- what is in flight holds the rest
                 ELSE p_window END;
END $$;

-- Rate-limit tokens for one call, or a lease of up to `p_calls` handed out for `p_life` seconds. A call holds a
-- 200's `p_cost` and keeps `p_headroom` of room for a 4xx; an ordinary answer gives the headroom back. ESI
-- charges a call on arrival: a row counts one window past its last call at most, and a dead process's tokens
-- stay spent.
CREATE OR REPLACE FUNCTION esi_take_tokens(p_now TIMESTAMPTZ, p_bucket TEXT, p_calls INTEGER, p_cost INTEGER,
                                           p_headroom INTEGER, p_limit INTEGER, p_window INTEGER, p_life INTEGER,
                                           p_floor INTEGER, p_reserve INTEGER, p_poll DOUBLE PRECISION,
                                           OUT id BIGINT, OUT calls INTEGER, OUT wait DOUBLE PRECISION)
LANGUAGE sql AS $$
    SELECT * FROM esi_take_calls(p_now, p_bucket, p_calls, p_cost => p_cost, p_headroom => p_headroom,
                                 p_frees => p_headroom, p_limit => p_limit, p_window => p_window,
                                 p_hold => p_window + p_life, p_life => p_life, p_floor => p_floor,
                                 p_calm_floor => p_floor, p_reserve => p_reserve, p_charged => true,
                                 p_poll => p_poll)
$$;

-- Error slots for one call, or a lease of up to `p_slots`: a slot is one error a call in flight may turn into,
-- costs one and keeps no headroom, and an answer without error gives it back. The floor is `p_calm_floor` after a
-- window without errors; a row counts `p_hold` seconds at most, and a dead process's slots are dropped (an error
-- it caused shows in ESI's count).
CREATE OR REPLACE FUNCTION esi_take_errors(p_now TIMESTAMPTZ, p_bucket TEXT, p_slots INTEGER, p_limit INTEGER,
                                           p_window INTEGER, p_hold INTEGER, p_floor INTEGER, p_calm_floor INTEGER,
                                           p_poll DOUBLE PRECISION,
                                           OUT id BIGINT, OUT slots INTEGER, OUT wait DOUBLE PRECISION)
LANGUAGE sql AS $$
    SELECT * FROM esi_take_calls(p_now, p_bucket, p_slots, p_cost => 1, p_headroom => 0, p_frees => 1,
                                 p_limit => p_limit, p_window => p_window, p_hold => p_hold, p_life => 0,
                                 p_floor => p_floor, p_calm_floor => p_calm_floor, p_reserve => 0,
                                 p_charged => false, p_poll => p_poll)
$$;

-- Settle answered calls, one or a batch: their in-flight rows go (a lease's row once its last call is answered),
-- and what each answer cost is spent in the whole second after it: `ago` is how long before the settling it came
-- (0 for now), measured by the caller's clock, so the second booked is never earlier than the answer, and never
-- later than the settling. Entries are (bucket, cost, window, used, ago), each bucket's in the order answered.
-- Where an answer said how much of a bucket ESI counts (`used`, its limit minus its remaining count, null where
-- not said), whatever ESI counts beyond this ledger is spent by someone else: booked as `other`, from the last
-- such answer of each bucket, once every cost of the batch is booked. Our calls still in flight count as ours,
-- spent: only what is sure to be another app's is booked.
CREATE OR REPLACE FUNCTION esi_settle(p_now TIMESTAMPTZ, p_ids BIGINT[], p_buckets TEXT[], p_costs INTEGER[],
                                      p_windows INTEGER[], p_used INTEGER[], p_ago DOUBLE PRECISION[])
RETURNS VOID LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    now_ TIMESTAMPTZ;
    since TIMESTAMPTZ;
    second_after TIMESTAMPTZ;
    counted BIGINT;
    seen TEXT[] := '{}';
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('esi:' || b, 0))  -- the buckets' locks, in their order
        FROM (SELECT DISTINCT b FROM unnest(p_buckets) AS t (b) ORDER BY b) t;
    now_ := coalesce(p_now, clock_timestamp());
    second_after := to_timestamp(ceil(extract(epoch FROM now_)));
    DELETE FROM esi_in_flight WHERE id = ANY(p_ids);
    INSERT INTO esi_spent (bucket, second, own)
        SELECT b, to_timestamp(ceil(extract(epoch FROM now_) - coalesce(ago, 0))), sum(c)
        FROM unnest(p_buckets, p_costs, p_ago) AS t (b, c, ago) WHERE c > 0 GROUP BY 1, 2
    ON CONFLICT (bucket, second) DO UPDATE SET own = esi_spent.own + EXCLUDED.own;
    FOR i IN REVERSE cardinality(p_buckets) .. 1 LOOP
        CONTINUE WHEN p_used[i] IS NULL OR p_buckets[i] = ANY(seen);
        seen := seen || p_buckets[i];
        since := now_ - make_interval(secs => p_windows[i]);
        SELECT coalesce(sum(own + other), 0) INTO counted FROM esi_spent
            WHERE bucket = p_buckets[i] AND second > since;
        counted := counted + (SELECT coalesce(sum(tokens), 0) FROM esi_in_flight WHERE bucket = p_buckets[i]);
        IF p_used[i] > counted THEN
            INSERT INTO esi_spent (bucket, second, other)
            VALUES (p_buckets[i], second_after, p_used[i] - counted)
            ON CONFLICT (bucket, second) DO UPDATE SET other = esi_spent.other + EXCLUDED.other;
        ELSIF p_used[i] > 0 THEN
            -- ESI counts something, though not beyond the ledger: a row of nothing says so for a window (the
            -- bucket is not calm, see esi_take_calls).
            INSERT INTO esi_spent (bucket, second) VALUES (p_buckets[i], second_after) ON CONFLICT DO NOTHING;
        END IF;
    END LOOP;
END $$;

-- Every ESI call by route group and status, for /metrics and /status.
CREATE TABLE IF NOT EXISTS esi_calls (
    route_group TEXT NOT NULL,
    status      INTEGER NOT NULL,
    calls       BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (route_group, status)
);

-- Notifications.
-- Where new killmails are announced: a Discord webhook, any URL taking JSON, or zKillboard's add-killmail API.
-- With no character or corporation listed, every new killmail matches; otherwise a kill (one of them among the
-- attackers) or a loss (one of them the victim), as kills/losses allow.
CREATE TABLE IF NOT EXISTS webhooks (
    id              BIGSERIAL PRIMARY KEY,
    name            TEXT UNIQUE NOT NULL,
    url             TEXT NOT NULL,
    format          TEXT NOT NULL DEFAULT 'discord' CHECK (format IN ('discord', 'json', 'zkillboard')),
    character_ids   BIGINT[] NOT NULL DEFAULT '{}',
    corporation_ids BIGINT[] NOT NULL DEFAULT '{}',
    kills           BOOLEAN NOT NULL DEFAULT true,
    losses          BOOLEAN NOT NULL DEFAULT true,
    min_value       NUMERIC,
    enabled         BOOLEAN NOT NULL DEFAULT true,
    paused_until    TIMESTAMPTZ,          -- the destination's 429 (or zKillboard's one a second) holds it until then
    refused         TEXT,                 -- the destination refused us (404/401/403): nothing more is sent to it
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The transactional outbox: one row per (destination, killmail), written in the transaction that stores the
-- killmail, so nothing is announced that was not stored and nothing stored is forgotten. Pending: not delivered
-- and next_attempt_at set; failed: not delivered and next_attempt_at NULL (given up, last_error says why).
CREATE TABLE IF NOT EXISTS outbox (
    id              BIGSERIAL PRIMARY KEY,
    webhook_id      BIGINT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    killmail_id     BIGINT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ DEFAULT now(),
    delivered_at    TIMESTAMPTZ,
    last_error      TEXT,
    UNIQUE (webhook_id, killmail_id)
);
CALL pg_temp.create_index('outbox_pending', 'outbox (next_attempt_at) WHERE delivered_at IS NULL');
CALL pg_temp.create_index('outbox_delivered', 'outbox (delivered_at) WHERE delivered_at IS NOT NULL');

-- Row counts the status page reads instead of counting big tables at every view or scrape: stored killmails
-- ('killmails'), runs by status ('sync_runs:<status>') and references without a stored killmail by their attempts
-- ('unstored_refs:<attempts>'). Kept exact by the triggers below, in the transaction of each insert, update or
-- delete, so a count is what count(*) would say once that transaction commits. A counter is the sum of its rows:
-- each session adds to the row of its own shard (its backend pid modulo 8), so that concurrent saves seldom wait
-- for each other's commit on one row.
CREATE TABLE IF NOT EXISTS row_counts (
    counter TEXT NOT NULL,
    shard   INTEGER NOT NULL,
    n       BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (counter, shard)
);

-- Add deltas to counters (in counter order: two sessions on one shard take its rows in the same order).
CREATE OR REPLACE FUNCTION count_rows(p_counters TEXT[], p_deltas BIGINT[]) RETURNS VOID
LANGUAGE sql AS $$
    INSERT INTO row_counts (counter, shard, n)
    SELECT c, pg_backend_pid() % 8, sum(d) FROM unnest(p_counters, p_deltas) AS t (c, d)
    WHERE d <> 0 GROUP BY c ORDER BY c
    ON CONFLICT (counter, shard) DO UPDATE SET n = row_counts.n + EXCLUDED.n
$$;

-- Count every counter of one table again from the table itself: when the triggers are first made, and after a
-- TRUNCATE (which fires no row trigger).
CREATE OR REPLACE FUNCTION recount_rows(p_table TEXT) RETURNS VOID
LANGUAGE plpgsql AS $$ BEGIN
    IF p_table = 'killmails' THEN
        DELETE FROM row_counts WHERE counter = 'killmails';
        INSERT INTO row_counts (counter, shard, n) SELECT 'killmails', 0, count(*) FROM killmails;
    END IF;
    IF p_table IN ('killmails', 'killmail_refs') THEN
        DELETE FROM row_counts WHERE starts_with(counter, 'unstored_refs:');
        INSERT INTO row_counts (counter, shard, n)
        SELECT 'unstored_refs:' || r.attempts, 0, count(*) FROM killmail_refs r
        WHERE NOT EXISTS (SELECT 1 FROM killmails k WHERE k.killmail_id = r.killmail_id) GROUP BY r.attempts;
    END IF;
    IF p_table = 'sync_runs' THEN
        DELETE FROM row_counts WHERE starts_with(counter, 'sync_runs:');
        INSERT INTO row_counts (counter, shard, n)
        SELECT 'sync_runs:' || status, 0, count(*) FROM sync_runs GROUP BY status;
    END IF;
END $$;

-- Killmails stored or deleted: the count, and their references' leaving or joining the unstored ones. The
-- references are read FOR SHARE: a failure being counted on one of them at the same moment (its attempts
-- changing) commits first, and its new attempts are read here, or waits for this commit and then sees the
-- killmail stored (killmail_refs_attempts_counted). A killmail is fetched only through a committed reference, so
-- a reference and its killmail are never inserted by two transactions at once.
CREATE OR REPLACE FUNCTION killmails_counted() RETURNS TRIGGER
LANGUAGE plpgsql AS $$
DECLARE
    sign INTEGER := CASE WHEN TG_OP = 'INSERT' THEN 1 ELSE -1 END;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM recount_rows('killmails');
        RETURN NULL;
    END IF;
    PERFORM count_rows(array_agg(c), array_agg(d)) FROM (
        SELECT 'killmails' AS c, sign * count(*) AS d FROM changed
        UNION ALL
        SELECT 'unstored_refs:' || r.attempts, -sign * count(*)
        FROM (SELECT r.attempts FROM killmail_refs r JOIN changed USING (killmail_id) FOR SHARE OF r) r
        GROUP BY r.attempts) t;
    RETURN NULL;
END $$;

-- References listed or deleted: those without a stored killmail join or leave the unstored ones.
CREATE OR REPLACE FUNCTION killmail_refs_counted() RETURNS TRIGGER
LANGUAGE plpgsql AS $$
DECLARE
    sign INTEGER := CASE WHEN TG_OP = 'INSERT' THEN 1 ELSE -1 END;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM recount_rows('killmail_refs');
        RETURN NULL;
    END IF;
    PERFORM count_rows(array_agg('unstored_refs:' || attempts), array_agg(sign * refs)) FROM (
        SELECT r.attempts, count(*) AS refs FROM changed r
        WHERE NOT EXISTS (SELECT 1 FROM killmails k WHERE k.killmail_id = r.killmail_id) GROUP BY r.attempts) t;
    RETURN NULL;
END $$;

-- A failure counted on an unstored reference moves it from one attempts counter to another.
CREATE OR REPLACE FUNCTION killmail_refs_attempts_counted() RETURNS TRIGGER
LANGUAGE plpgsql AS $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM killmails k WHERE k.killmail_id = NEW.killmail_id) THEN
        PERFORM count_rows(ARRAY['unstored_refs:' || OLD.attempts, 'unstored_refs:' || NEW.attempts],
                           ARRAY[-1, 1]);
    END IF;
    RETURN NULL;
END $$;

-- Runs recorded, deleted or given another status.
CREATE OR REPLACE FUNCTION sync_runs_counted() RETURNS TRIGGER
LANGUAGE plpgsql AS $$ BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM recount_rows('sync_runs');
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM count_rows(ARRAY['sync_runs:' || OLD.status, 'sync_runs:' || NEW.status], ARRAY[-1, 1]);
    ELSE
        PERFORM count_rows(array_agg('sync_runs:' || status), array_agg(runs)) FROM (
            SELECT status, CASE WHEN TG_OP = 'INSERT' THEN 1 ELSE -1 END * count(*) AS runs
            FROM changed GROUP BY status) t;
    END IF;
    RETURN NULL;
END $$;

-- The triggers, made once; the counts are taken in the same transaction, with the tables' writers held off by the
-- lock CREATE TRIGGER takes, so no write falls between the count and the first trigger.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'killmails'::regclass AND tgname = 'killmails_added') THEN
        LOCK TABLE killmails, killmail_refs IN SHARE ROW EXCLUSIVE MODE;
        CREATE TRIGGER killmails_added AFTER INSERT ON killmails REFERENCING NEW TABLE AS changed
            FOR EACH STATEMENT EXECUTE FUNCTION killmails_counted();
        CREATE TRIGGER killmails_removed AFTER DELETE ON killmails REFERENCING OLD TABLE AS changed
            FOR EACH STATEMENT EXECUTE FUNCTION killmails_counted();
        CREATE TRIGGER killmails_truncated AFTER TRUNCATE ON killmails
            FOR EACH STATEMENT EXECUTE FUNCTION killmails_counted();
        CREATE TRIGGER killmail_refs_added AFTER INSERT ON killmail_refs REFERENCING NEW TABLE AS changed
            FOR EACH STATEMENT EXECUTE FUNCTION killmail_refs_counted();
        CREATE TRIGGER killmail_refs_removed AFTER DELETE ON killmail_refs REFERENCING OLD TABLE AS changed
            FOR EACH STATEMENT EXECUTE FUNCTION killmail_refs_counted();
        CREATE TRIGGER killmail_refs_truncated AFTER TRUNCATE ON killmail_refs
            FOR EACH STATEMENT EXECUTE FUNCTION killmail_refs_counted();
        CREATE TRIGGER killmail_refs_attempts AFTER UPDATE OF attempts ON killmail_refs
            FOR EACH ROW WHEN (OLD.attempts IS DISTINCT FROM NEW.attempts)
            EXECUTE FUNCTION killmail_refs_attempts_counted();
        PERFORM recount_rows('killmails');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'sync_runs'::regclass AND tgname = 'sync_runs_added') THEN
        LOCK TABLE sync_runs IN SHARE ROW EXCLUSIVE MODE;
        CREATE TRIGGER sync_runs_added AFTER INSERT ON sync_runs REFERENCING NEW TABLE AS changed
            FOR EACH STATEMENT EXECUTE FUNCTION sync_runs_counted();
        CREATE TRIGGER sync_runs_removed AFTER DELETE ON sync_runs REFERENCING OLD TABLE AS changed
            FOR EACH STATEMENT EXECUTE FUNCTION sync_runs_counted();
        CREATE TRIGGER sync_runs_truncated AFTER TRUNCATE ON sync_runs
            FOR EACH STATEMENT EXECUTE FUNCTION sync_runs_counted();
        CREATE TRIGGER sync_runs_status AFTER UPDATE OF status ON sync_runs
            FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION sync_runs_counted();
        PERFORM recount_rows('sync_runs');
    END IF;
END $$;

-- The status page's failed references, latest failure first (db.failed_refs), and its runs of the last 24 hours
-- read from the index alone (db.run_stats and the hourly charts).
CALL pg_temp.create_index('killmail_refs_failed',
                          'killmail_refs (next_attempt_at DESC NULLS LAST, killmail_id DESC) WHERE attempts > 0');
CALL pg_temp.create_index('sync_runs_finished_covering', 'sync_runs (finished_at) INCLUDE (started_at, status)');

-- What an older version made and this one does not have goes, so that applying this file upgrades a database in
-- place: a column and two foreign keys (attackers and items are written with their killmail, see above), and
-- every other signature of the ledger's functions (workers still calling one need this version's code).
CALL pg_temp.drop_column('esi_limits', 'next_slot');
CALL pg_temp.drop_constraint('attackers', 'attackers_killmail_id_fkey');
CALL pg_temp.drop_constraint('killmail_items', 'killmail_items_killmail_id_fkey');
DO $$
DECLARE
    old REGPROCEDURE;
BEGIN
    FOR old IN SELECT p.oid::regprocedure FROM pg_proc p
               WHERE p.pronamespace = current_schema()::regnamespace
                 AND p.proname IN ('esi_take', 'esi_take_calls', 'esi_take_tokens', 'esi_take_errors', 'esi_settle')
                 AND p.oid NOT IN (
                     'esi_take_calls(timestamptz, text, int, int, int, int, int, int, int, int, int, int, int, bool,
                                     float8)'::regprocedure,
                     'esi_take_tokens(timestamptz, text, int, int, int, int, int, int, int, int, float8)'::regprocedure,
                     'esi_take_errors(timestamptz, text, int, int, int, int, int, int, float8)'::regprocedure,
                     'esi_settle(timestamptz, bigint[], text[], int[], int[], int[], float8[])'::regprocedure) LOOP
        EXECUTE format('DROP FUNCTION %s', old);
    END LOOP;
END $$;
