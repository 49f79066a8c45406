"""All SQL of the killmail sync worker. Functions take the connection first and never commit: the caller does."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb

SCHEMA_PATH = Path(__file__).with_name("schema.sql")

# What connect returns, and what every function here takes first: a connection whose rows are dicts.
Connection: TypeAlias = psycopg.Connection[DictRow]

# Session-level advisory locks live in a namespace each, so a character id and a corporation id never collide.
LOCK_CHARACTER = 1
LOCK_CORPORATION = 2
LOCK_PRICES = 3  # one process at a time refreshes the market prices
# ESI's rate-limit groups whose buckets are per character: esi_limits names them '<group>:<character id>'.
OWNER_BUCKET_GROUPS = ("char-killmail", "corp-killmail")
_OWNER_GROUP_SQL = "split_part(bucket, ':', 1)"  # a per-character bucket's group (limits._per_owner in SQL)
# Not a per-character bucket: one every caller shares, or a group's own row ('char-killmail', its limit). schema.sql's
# index esi_limits_shared has this very predicate, which a query names word for word (constants, not parameters)
# for the planner to use the index.
_SHARED_BUCKET_SQL = "(" + " AND ".join(f"bucket NOT LIKE '{group}:%%'" for group in OWNER_BUCKET_GROUPS) + ")"


# TCP keepalives of this session, asked of the server. A worker host that vanishes (power, network) never closes
# its connections: with the kernel's defaults PostgreSQL finds the session dead after 2 h 11 min (15 minutes of
# retransmissions if a reply was in flight), and until then its character locks and killmail claims hold, so
# those pilots and killmails wait. With these, about 2 minutes. tcp_user_timeout (milliseconds) is PostgreSQL 12's:
# an older server keeps the rest. Behind a pooler (PgBouncer in session mode) they apply to the pooler's own
# connection, and the pooler's keepalive settings decide.
SESSION_KEEPALIVES = {"tcp_keepalives_idle": "60", "tcp_keepalives_interval": "10", "tcp_keepalives_count": "6",
                      "tcp_user_timeout": "120000"}


# The client end probes too: a server (or a network path) that vanished without a word would otherwise hold a
# query's wait, and the job waiting on it, for the kernel's two hours. libpq's connection parameters, which a
# DATABASE_URL that sets its own overrides.
CLIENT_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
                     "keepalives_count": "3", "tcp_user_timeout": "60000"}


def connect(url: str, *, autocommit: bool = False, connect_timeout: int = 10) -> Connection:
    """Open a connection whose rows are dicts, with the session's keepalives set at both ends (one round trip)."""
    given = psycopg.conninfo.conninfo_to_dict(url)
    client: dict[str, Any] = {k: v for k, v in CLIENT_KEEPALIVES.items() if k not in given}
    conn = psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=connect_timeout, **client)
    try:
        conn.execute(
            "SELECT set_config(name, value, false) FROM (VALUES "
            + ", ".join(["(%s, %s)"] * len(SESSION_KEEPALIVES))
            + ") AS wanted (name, value) WHERE name IN (SELECT name FROM pg_settings)",
            [v for pair in SESSION_KEEPALIVES.items() for v in pair])
        conn.autocommit = autocommit
    except BaseException:
        conn.close()
        raise
    return conn


def one_row(cursor: psycopg.Cursor[DictRow]) -> DictRow:
    """The row of a statement that always returns one: an aggregate, a function's result, an upsert's RETURNING."""
    row = cursor.fetchone()
    assert row is not None, "the statement returned no row"
    return row


@contextmanager
def autocommitted(conn: Connection) -> Iterator[None]:
    """Each statement of the block is a transaction of its own. psycopg opens a transaction with a BEGIN of its own
    round trip and ends it with a COMMIT of another: a write that is one statement costs three round trips in a
    transaction and one here. What the connection had open is committed first."""
    conn.commit()
    conn.autocommit = True
    try:
        yield
    finally:
        if not (conn.closed or conn.broken):
            conn.autocommit = False


def apply_schema(conn: Connection) -> None:
    """Create or complete every table; harmless to run again."""
    # One advisory lock so two processes applying the schema at once do not race on CREATE IF NOT EXISTS.
    conn.execute("SELECT pg_advisory_xact_lock(0, 0)")
    conn.execute(SCHEMA_PATH.read_text())


def token_sha256(refresh_token: str) -> str:
    """The sha256 of a refresh token as stored (sealed or not), kept for a revoked grant (never the token)."""
    return hashlib.sha256(refresh_token.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- users

# A usable grant: a refresh token, and not the very one SSO answered invalid_grant for (mark_revoked). The
# web app writing a new token at login makes the user usable again. The hash is of the column as stored, sealed
# or not (tokens.py), so this needs no key.
_LIVE_GRANT_SQL = """
    (refresh_token IS NOT NULL AND refresh_token <> ''
     AND (revoked_token_sha256 IS NULL
          OR revoked_token_sha256 <> encode(sha256(convert_to(refresh_token, 'UTF8')), 'hex')))
"""

# A user's interval: its own, where set, exactly; else SYNC_INTERVAL_SECONDS, four times longer for a pilot with
# no new killmail for a week (as zKillboard does) and sixteen times for a month, never longer than a day.
_INTERVAL_SQL = """
    make_interval(secs => COALESCE(sync_interval_seconds,
         LEAST(86400, %(interval)s *
           CASE WHEN last_new_killmail_at IS NULL AND last_sync_at IS NULL THEN 1
                WHEN COALESCE(last_new_killmail_at, created_at) < %(now)s - interval '30 days' THEN 16
                WHEN COALESCE(last_new_killmail_at, created_at) < %(now)s - interval '7 days' THEN 4
                ELSE 1 END)))
"""
# A user is due when it has a usable grant and its last sync is older than its interval.
_DUE_SQL = _LIVE_GRANT_SQL + f"AND (last_sync_at IS NULL OR last_sync_at <= %(now)s - {_INTERVAL_SQL})"


# Not queued: no claim, or one older than the stale-claim limit (its job was lost).
_UNCLAIMED_SQL = "(queued_at IS NULL OR queued_at < %(now)s - make_interval(secs => %(stale)s))"

# The due users not queued, first syncs first, then the longest unsynced; `due` repeats their number on every row.
_DUE_USERS_SQL = f"""
    SELECT character_id, character_name, last_sync_at, count(*) OVER () AS due FROM users
    WHERE {_DUE_SQL} AND {_UNCLAIMED_SQL}
    ORDER BY last_sync_at NULLS FIRST, character_id
"""


def due_users(conn: Connection, now: datetime, *, interval: int, stale_after: int) -> list[dict]:
    """The due users that are not queued, first syncs first (what a run would claim)."""
    return conn.execute(_DUE_USERS_SQL, {"now": now, "interval": interval, "stale": stale_after}).fetchall()


def open_due_users(conn: Connection, now: datetime, *, interval: int, stale_after: int
                   ) -> psycopg.ServerCursor[DictRow]:
    """due_users as a cursor held past commits (WITH HOLD): the caller commits once, then fetches a batch at a
    time and claims it (claim_users), committing each, and closes the cursor at the end."""
    cursor = conn.cursor("due_users", withhold=True)
    cursor.execute(_DUE_USERS_SQL, {"now": now, "interval": interval, "stale": stale_after})
    return cursor


def claim_users(conn: Connection, character_ids: Sequence[int], now: datetime, *, interval: int,
                stale_after: int) -> set[int]:
    """Claim those of these users still due and not queued, for this session until confirm_claims; the ids
    claimed. One whose row another transaction holds (its job ending, another run claiming it) is skipped."""
    rows = conn.execute(
        f"""
        UPDATE users SET queued_at = %(now)s, claimed_by = pg_backend_pid()
        -- The ids outside the subquery too: the planner then reaches the rows by the index, not by a scan of all.
        WHERE character_id = ANY(%(ids)s) AND character_id IN (
            SELECT character_id FROM users
            WHERE character_id = ANY(%(ids)s) AND {_DUE_SQL} AND {_UNCLAIMED_SQL}
            FOR UPDATE SKIP LOCKED)
        RETURNING character_id
        """,
        {"ids": list(character_ids), "now": now, "interval": interval, "stale": stale_after},
    ).fetchall()
    return {row["character_id"] for row in rows}


def claim_due_users(conn: Connection, now: datetime, *, interval: int, stale_after: int) -> list[dict]:
    """Claim every due user that is not queued, in one go (for this session, until confirm_claims); returns
    them, first syncs first. The producer claims a batch at a time instead (open_due_users)."""
    due = due_users(conn, now, interval=interval, stale_after=stale_after)
    claimed = claim_users(conn, [u["character_id"] for u in due], now, interval=interval, stale_after=stale_after)
    return [u for u in due if u["character_id"] in claimed]


def claim_user(conn: Connection, character_id: int, now: datetime, *, stale_after: int) -> dict | None:
    """Mark one user as queued now unless it already is; None when unknown or already queued."""
    return conn.execute(
        """
        UPDATE users SET queued_at = %(now)s
        WHERE character_id = %(id)s
          AND (queued_at IS NULL OR queued_at < %(now)s - make_interval(secs => %(stale)s))
        RETURNING character_id, character_name, last_sync_at
        """,
        {"now": now, "id": character_id, "stale": stale_after},
    ).fetchone()


def release_user(conn: Connection, character_id: int) -> None:
    """Forget that a user is queued (its message was not handed to the broker, or its job ended)."""
    conn.execute("UPDATE users SET queued_at = NULL WHERE character_id = %s", (character_id,))


def get_user(conn: Connection, character_id: int) -> dict | None:
    """One user's row, with `revoked` telling whether it has no usable grant (a new login is needed)."""
    return conn.execute(
        f"""
        SELECT *, NOT {_LIVE_GRANT_SQL} AS revoked
        FROM users WHERE character_id = %s
        """,
        (character_id,),
    ).fetchone()


def try_lock(conn: Connection, namespace: int, key: int) -> bool:
    """Take the session-level lock on a character or corporation (namespace LOCK_CHARACTER or LOCK_CORPORATION)
    without waiting; False when another holds it."""
    return one_row(conn.execute("SELECT pg_try_advisory_lock(%s, %s) AS ok", (namespace, _lock_key(key))))["ok"]


def wait_lock(conn: Connection, namespace: int, key: int, *, timeout: float) -> bool:
    """Take the session-level lock, waiting up to `timeout` seconds for its holder; False when it was not freed.
    Ends the caller's transaction; works in autocommit mode too (the wait's own transaction bounds it)."""
    if not conn.autocommit:
        conn.commit()
    try:
        with conn.transaction():
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{int(timeout * 1000)}ms",))
            conn.execute("SELECT pg_advisory_lock(%s, %s)", (namespace, _lock_key(key)))
    except psycopg.errors.LockNotAvailable:
        return False
    return True


def unlock(conn: Connection, namespace: int, key: int) -> None:
    """Release a lock taken by try_lock."""
    conn.execute("SELECT pg_advisory_unlock(%s, %s)", (namespace, _lock_key(key)))


def _lock_key(key: int) -> int:
    # The two-key advisory lock takes int4 keys; EVE ids fit, but fold larger ones rather than fail.
    return key if -(2**31) <= key < 2**31 else (key % (2**31))


def store_tokens(conn: Connection, character_id: int, access_token: str, refresh_token: str, expires_at: datetime, *,
                 replaces: str) -> bool:
    """Record a refreshed access token and the rotated refresh token together, only where the row still holds the
    refresh token that was refreshed (`replaces`); False when the web app wrote a new login meanwhile."""
    # Compare and set: a login written while SSO answered is newer than this grant and must stay.
    cursor = conn.execute(
        """
        UPDATE users SET access_token = %s, refresh_token = %s, expires_at = %s, token_error = NULL
        WHERE character_id = %s AND refresh_token = %s
        """,
        (access_token, refresh_token, expires_at, character_id, replaces),
    )
    return cursor.rowcount == 1


def stored_refresh_tokens(conn: Connection, *, after: int = 0, limit: int = 500) -> list[dict]:
    """Users holding a refresh token, with it as stored, by character id beyond `after` (a batch of them)."""
    return conn.execute(
        """
        SELECT character_id, refresh_token FROM users
        WHERE character_id > %s AND refresh_token IS NOT NULL AND refresh_token <> ''
        ORDER BY character_id LIMIT %s
        """,
        (after, limit),
    ).fetchall()


def replace_stored_token(conn: Connection, character_id: int, stored: str, *, replaces: str) -> bool:
    """Store a refresh token rewritten under another key (or sealed at last), only where the row still holds
    `replaces`; a revoked grant stays revoked. False when the row changed meanwhile."""
    cursor = conn.execute(
        """
        UPDATE users SET refresh_token = %(new)s,
            revoked_token_sha256 = CASE WHEN revoked_token_sha256 = %(old_sha)s THEN %(new_sha)s
                                        ELSE revoked_token_sha256 END
        WHERE character_id = %(id)s AND refresh_token = %(old)s
        """,
        {"new": stored, "old": replaces, "id": character_id, "old_sha": token_sha256(replaces),
         "new_sha": token_sha256(stored)},
    )
    return cursor.rowcount == 1


def expire_access_token(conn: Connection, character_id: int, now: datetime) -> None:
    """Make the next job refresh the access token (ESI refused it before its time)."""
    conn.execute("UPDATE users SET expires_at = %s WHERE character_id = %s", (now, character_id))


def mark_revoked(conn: Connection, character_id: int, refresh_token: str, error: str) -> bool:
    """Remember that this refresh token (as stored, sealed or not) is dead, so the user is not queued until it
    logs in again; only while the row still holds that token (False when the web app has already replaced it with
    a new login)."""
    cursor = conn.execute(
        """
        UPDATE users SET revoked_token_sha256 = %s, token_error = %s, queued_at = NULL,
                         last_sync_status = 'needs_relogin'
        WHERE character_id = %s AND refresh_token = %s
        """,
        (token_sha256(refresh_token), error, character_id, refresh_token),
    )
    return cursor.rowcount == 1


def save_login(conn: Connection, character_id: int, character_name: str, access_token: str, refresh_token: str,
               expires_at: datetime, scopes: str) -> bool:
    """Write a pilot who logged in, as the web app would, with its grant's scopes; True when the user is new.
    A returning pilot's new grant replaces the old one, ends its needing a new login, and has its Director role
    asked again."""
    return one_row(conn.execute(
        """
        INSERT INTO users (character_id, character_name, access_token, refresh_token, expires_at, scopes)
        VALUES (%(id)s, %(name)s, %(access)s, %(refresh)s, %(expires)s, %(scopes)s)
        ON CONFLICT (character_id) DO UPDATE SET
            character_name = EXCLUDED.character_name, access_token = EXCLUDED.access_token,
            refresh_token = EXCLUDED.refresh_token, expires_at = EXCLUDED.expires_at, scopes = EXCLUDED.scopes,
            revoked_token_sha256 = NULL, token_error = NULL, is_director = NULL
        RETURNING (xmax = 0) AS inserted
        """,
        {"id": character_id, "name": character_name, "access": access_token, "refresh": refresh_token,
         "expires": expires_at, "scopes": scopes},
    ))["inserted"]


def forget_tokens(conn: Connection, character_id: int) -> None:
    """Clear a pilot's tokens (an operator forgot it): it is synced no more; its killmails and runs stay."""
    conn.execute(
        """
        UPDATE users SET access_token = NULL, refresh_token = NULL, expires_at = NULL, queued_at = NULL,
                         token_error = 'forgotten: its grant was revoked by an operator'
        WHERE character_id = %s
        """,
        (character_id,),
    )


def save_login_state(conn: Connection, state: str, code_verifier: str, scopes: str, now: datetime, *, max_age: int,
                     client: str = "") -> None:
    """Remember a login under way by its state's hash, and delete those older than max_age seconds."""
    conn.execute("DELETE FROM login_states WHERE created_at < %s", (now - timedelta(seconds=max_age),))
    conn.execute("INSERT INTO login_states (state_sha256, code_verifier, scopes, created_at, client) "
                 "VALUES (%s, %s, %s, %s, %s)", (token_sha256(state), code_verifier, scopes, now, client))


def logins_under_way(conn: Connection, client: str, since: datetime) -> tuple[int, int]:
    """Logins started since then and not used up yet: by anyone, and by this client."""
    row = one_row(conn.execute("SELECT count(*) AS total, count(*) FILTER (WHERE client = %s) AS mine "
                            "FROM login_states WHERE created_at >= %s", (client, since)))
    return row["total"], row["mine"]


def take_login_state(conn: Connection, state: str, now: datetime, *, max_age: int) -> dict | None:
    """Use up a login's state: its code_verifier and scopes, or None when it is unknown, used or too old."""
    row = conn.execute("DELETE FROM login_states WHERE state_sha256 = %s RETURNING code_verifier, scopes, created_at",
                       (token_sha256(state),)).fetchone()
    return row if row is not None and row["created_at"] >= now - timedelta(seconds=max_age) else None


def save_profile(conn: Connection, character_id: int, *, corporation_id: int | None = None, scopes: str | None = None,
                 checked_at: datetime | None = None) -> None:
    """Record what the worker learned of a pilot: its corporation (from ESI) and its token's scopes. A pilot in
    a new corporation has its Director role asked again: what was known was of the old one."""
    conn.execute(
        """
        UPDATE users SET corporation_id = COALESCE(%(corp)s, corporation_id), scopes = COALESCE(%(scopes)s, scopes),
               corporation_checked_at = COALESCE(%(checked)s, corporation_checked_at),
               is_director = CASE WHEN %(corp)s <> corporation_id THEN NULL ELSE is_director END,
               director_checked_at = CASE WHEN %(corp)s <> corporation_id THEN NULL ELSE director_checked_at END
        WHERE character_id = %(id)s
        """,
        {"corp": corporation_id, "scopes": scopes, "checked": checked_at, "id": character_id},
    )


def set_director(conn: Connection, character_id: int, is_director: bool, *, checked_at: datetime) -> None:
    """Record whether a pilot may read its corporation's killmails (a 403 says it may not), and when it was
    learned."""
    conn.execute("UPDATE users SET is_director = %s, director_checked_at = %s WHERE character_id = %s",
                 (is_director, checked_at, character_id))


# ---------------------------------------------------------------------------------------------- corporations

CORPORATION_SCOPE = "esi-killmails.read_corporation_killmails.v1"  # the grant a login asks for (web/sso.py)

# A member who may read the corporation's killmails: a live grant with the corporation scope, not known to
# lack the Director role; a pilot found without it is asked again a week later (roles are given any day; a new
# corporation clears what was known, in save_profile). Known directors first, then those never asked.
_ELIGIBLE_SQL = f"""
    SELECT DISTINCT ON (u.corporation_id) u.corporation_id, u.character_id, u.character_name
    FROM users u
    WHERE u.corporation_id IS NOT NULL
      AND (u.is_director IS NOT FALSE OR u.director_checked_at IS NULL
           OR u.director_checked_at <= %(now)s - interval '7 days')
      AND '{CORPORATION_SCOPE}' = ANY(string_to_array(COALESCE(u.scopes, ''), ' '))
      AND {_LIVE_GRANT_SQL}
    ORDER BY u.corporation_id, CASE WHEN u.is_director THEN 0 WHEN u.is_director IS NULL THEN 1 ELSE 2 END,
             u.character_id
"""


# A corporation (c) is due when its last sync is older than the interval and it is not queued.
_CORPORATION_DUE_SQL = """
    (c.last_sync_at IS NULL OR c.last_sync_at <= %(now)s - make_interval(secs => %(interval)s))
    AND (c.queued_at IS NULL OR c.queued_at < %(now)s - make_interval(secs => %(stale)s))
"""


_DUE_CORPORATIONS_SQL = f"""
    SELECT e.corporation_id, e.character_id, e.character_name, c.last_sync_at, count(*) OVER () AS due
    FROM ({_ELIGIBLE_SQL}) e LEFT JOIN corporations c ON c.corporation_id = e.corporation_id
    WHERE {_CORPORATION_DUE_SQL}
    ORDER BY e.corporation_id
"""


def due_corporations(conn: Connection, now: datetime, *, interval: int, stale_after: int) -> list[dict]:
    """The due corporations with an eligible member, not queued, each with that member (what a run would claim)."""
    return conn.execute(_DUE_CORPORATIONS_SQL, {"now": now, "interval": interval, "stale": stale_after}).fetchall()


def add_eligible_corporations(conn: Connection, now: datetime) -> None:
    """Make a row for every corporation that has an eligible member (claim_corporations claims rows)."""
    conn.execute(f"""
        INSERT INTO corporations (corporation_id)
        SELECT corporation_id FROM ({_ELIGIBLE_SQL}) e
        ON CONFLICT DO NOTHING
    """, {"now": now})


def open_due_corporations(conn: Connection, now: datetime, *, interval: int, stale_after: int
                          ) -> psycopg.ServerCursor[DictRow]:
    """due_corporations as a held cursor, as open_due_users (add_eligible_corporations first)."""
    cursor = conn.cursor("due_corporations", withhold=True)
    cursor.execute(_DUE_CORPORATIONS_SQL, {"now": now, "interval": interval, "stale": stale_after})
    return cursor


def claim_corporations(conn: Connection, due: Sequence[dict], now: datetime, *, interval: int,
                       stale_after: int) -> set[int]:
    """Claim these corporations (rows of due_corporations) where still due and not queued, each through the member
    it came with, for this session until confirm_claims; the ids claimed."""
    rows = conn.execute(
        f"""
        UPDATE corporations c SET queued_at = %(now)s, claimed_by = pg_backend_pid(),
               director_character_id = v.character_id
        FROM unnest(%(ids)s::bigint[], %(members)s::bigint[]) AS v (corporation_id, character_id)
        WHERE c.corporation_id = v.corporation_id AND c.corporation_id = ANY(%(ids)s) AND c.corporation_id IN (
            SELECT corporation_id FROM corporations c
            WHERE corporation_id = ANY(%(ids)s) AND {_CORPORATION_DUE_SQL}
            FOR UPDATE SKIP LOCKED)
        RETURNING c.corporation_id
        """,
        {"ids": [r["corporation_id"] for r in due], "members": [r["character_id"] for r in due], "now": now,
         "interval": interval, "stale": stale_after},
    ).fetchall()
    return {row["corporation_id"] for row in rows}


def claim_due_corporations(conn: Connection, now: datetime, *, interval: int, stale_after: int) -> list[dict]:
    """Claim every due corporation that has an eligible member, in one go, as claim_due_users; returns them with
    that member."""
    add_eligible_corporations(conn, now)
    due = due_corporations(conn, now, interval=interval, stale_after=stale_after)
    claimed = claim_corporations(conn, due, now, interval=interval, stale_after=stale_after)
    return [c for c in due if c["corporation_id"] in claimed]


def get_corporation(conn: Connection, corporation_id: int) -> dict | None:
    """One corporation's sync state."""
    return conn.execute("SELECT * FROM corporations WHERE corporation_id = %s", (corporation_id,)).fetchone()


def release_corporation(conn: Connection, corporation_id: int) -> None:
    """Forget that a corporation is queued."""
    conn.execute("UPDATE corporations SET queued_at = NULL WHERE corporation_id = %s", (corporation_id,))


def confirm_claims(conn: Connection, kind: str, owner_ids: Sequence[int]) -> None:
    """The broker confirmed these jobs ('character' or 'corporation'): this session's claims of them stand on
    their own now, and outlive it."""
    if not owner_ids:
        return
    table, column = _STATE_TABLES[kind]
    conn.execute(sql.SQL("UPDATE {} SET claimed_by = NULL WHERE {} = ANY(%s) AND claimed_by = pg_backend_pid()")
                 .format(sql.Identifier(table), sql.Identifier(column)), (list(owner_ids),))


def release_claims(conn: Connection, kind: str, owner_ids: Sequence[int]) -> None:
    """The broker did not take these jobs: free this session's claims of them, so the next run queues them."""
    if not owner_ids:
        return
    table, column = _STATE_TABLES[kind]
    conn.execute(sql.SQL("UPDATE {} SET queued_at = NULL, claimed_by = NULL "
                         "WHERE {} = ANY(%s) AND claimed_by = pg_backend_pid()")
                 .format(sql.Identifier(table), sql.Identifier(column)), (list(owner_ids),))


def release_unconfirmed(conn: Connection, kind: str) -> int:
    """Free every claim whose job the broker never confirmed: this session's own, and those of producer sessions
    that are gone (a run killed between publishing and the confirm); how many. A session is gone when no backend
    has its pid: a killed process's connection closes with it, a vanished host's within the keepalive time
    (SESSION_KEEPALIVES); a pid reused by a new backend meanwhile keeps the claim until it is stale."""
    table, _ = _STATE_TABLES[kind]
    # No index on claimed_by: one scan a run costs less than keeping an index through every claim and confirm,
    # and leaves a confirm a HOT update.
    return conn.execute(sql.SQL("""
        UPDATE {} SET queued_at = NULL, claimed_by = NULL
        WHERE claimed_by IS NOT NULL
          AND (claimed_by = pg_backend_pid()
               OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = claimed_by))
        """).format(sql.Identifier(table))).rowcount


# ---------------------------------------------------------------------------------------------- sync state

# Where a job keeps its owner's sync state, by kind ('character' or 'corporation', as Job.kind and
# sync_runs.kind): the pilot's users row or the corporation's row. Identifiers come from this table only.
_STATE_TABLES = {"character": ("users", "character_id"), "corporation": ("corporations", "corporation_id")}


def save_list_cache(conn: Connection, kind: str, owner_id: int, etag: str | None, expires_at: datetime | None) -> None:
    """Keep a recent list's ETag and Expires for the next poll."""
    table, column = _STATE_TABLES[kind]
    conn.execute(
        sql.SQL("UPDATE {} SET list_etag = %s, list_expires_at = %s WHERE {} = %s")
        .format(sql.Identifier(table), sql.Identifier(column)),
        (etag, expires_at, owner_id),
    )


# A sync's end on its pilot's (or corporation's) row: freed for the next producer run.
_FINISH_SQL = """
    UPDATE {} SET last_sync_at = %(finished_at)s, last_sync_status = %(status)s, queued_at = NULL,
           last_new_killmail_at = CASE WHEN %(found_new)s THEN %(finished_at)s ELSE last_new_killmail_at END,
           list_etag = CASE WHEN %(cached)s THEN %(etag)s ELSE list_etag END,
           list_expires_at = CASE WHEN %(cached)s THEN %(expires_at)s ELSE list_expires_at END
    WHERE {} = %(owner_id)s
"""


def finish_sync(conn: Connection, kind: str, owner_id: int, now: datetime, status: str, *, found_new: bool) -> None:
    """Record the end of a pilot's (or corporation's) sync and free it for the next producer run."""
    table, column = _STATE_TABLES[kind]
    conn.execute(sql.SQL(_FINISH_SQL).format(sql.Identifier(table), sql.Identifier(column)),
                 {"finished_at": now, "status": status, "found_new": found_new, "owner_id": owner_id,
                  "cached": False, "etag": None, "expires_at": None})


# ---------------------------------------------------------------------------------------------- references


# Where a reference came from, by kind: a pilot's own list or its corporation's. Identifiers come from this
# table only.
_LINKS = {"character": ("character_killmails", "character_id"),
          "corporation": ("corporation_killmails", "corporation_id")}


def store_refs(conn: Connection, kind: str, owner_id: int, refs: Sequence[tuple[int, str]]) -> int:
    """Store listed (killmail_id, killmail_hash) pairs and link them to their pilot or corporation; returns how
    many links are new."""
    if not refs:
        return 0
    refs = sorted(refs)  # id order: jobs inserting shared references at once wait in one order, never in a cycle
    ids = [r[0] for r in refs]
    hashes = [r[1] for r in refs]
    conn.execute(
        """
        INSERT INTO killmail_refs (killmail_id, killmail_hash)
        SELECT * FROM unnest(%s::bigint[], %s::text[])
        ON CONFLICT (killmail_id) DO NOTHING
        """,
        (ids, hashes),
    )
    table, column = _LINKS[kind]
    return conn.execute(
        sql.SQL("INSERT INTO {} ({}, killmail_id) SELECT %s, unnest(%s::bigint[]) ON CONFLICT DO NOTHING")
        .format(sql.Identifier(table), sql.Identifier(column)),
        (owner_id, ids),
    ).rowcount


# A reference `r` a sync may fetch now: no stored killmail, tries left, and its retry time come.
_PENDING_REF_SQL = """
    NOT EXISTS (SELECT 1 FROM killmails k WHERE k.killmail_id = r.killmail_id)
    AND r.attempts < %(max)s
    AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= %(now)s)
"""


def pending_refs(conn: Connection, kind: str, owner_id: int, now: datetime, *, max_attempts: int) -> list[dict]:
    """A pilot's (or corporation's) references with no stored killmail that may be fetched now, newest first."""
    table, column = _LINKS[kind]
    return conn.execute(
        sql.SQL("""
        SELECT r.killmail_id, r.killmail_hash, r.first_seen_at
        FROM {} c
        JOIN killmail_refs r USING (killmail_id)
        WHERE c.{} = %(id)s AND {}
        ORDER BY r.killmail_id DESC
        """).format(sql.Identifier(table), sql.Identifier(column), sql.SQL(_PENDING_REF_SQL)),
        {"id": owner_id, "now": now, "max": max_attempts},
    ).fetchall()


_USER_TO_SYNC_SQL = f"""
    SELECT *, NOT {_LIVE_GRANT_SQL} AS revoked,
           EXISTS (SELECT 1 FROM character_killmails c JOIN killmail_refs r USING (killmail_id)
                   WHERE c.character_id = users.character_id AND {_PENDING_REF_SQL}) AS refs_pending
    FROM users
"""
# The same row, and its list bucket's tokens for one call taken in the ledger (esi_take_tokens, as limits.take
# would), only where the list is to be read: a live grant, and Expires passed (or a full sync).
# (A CASE runs its subquery only when its condition holds; both CTEs are evaluated once.)
_USER_TO_SYNC_TAKING_SQL = f"""
    WITH u AS MATERIALIZED ({_USER_TO_SYNC_SQL} WHERE character_id = %(id)s),
    t AS MATERIALIZED (
        SELECT CASE WHEN NOT u.revoked AND (%(full)s OR u.list_expires_at IS NULL OR u.list_expires_at <= %(now)s)
               THEN (SELECT ARRAY[id, calls] FROM esi_take_tokens(
                         %(ledger_now)s, %(bucket)s, p_calls => %(calls)s, p_cost => %(cost)s,
                         p_headroom => %(headroom)s, p_limit => %(limit)s, p_window => %(window)s, p_life => %(life)s,
                         p_floor => %(floor)s, p_reserve => %(reserve)s, p_poll => 0))
               END AS taken
        FROM u)
    SELECT u.*, t.taken[1] AS ledger_id, t.taken[2]::int AS ledger_calls FROM u, t
"""


def get_user_to_sync(conn: Connection, character_id: int, now: datetime, *, max_attempts: int,
                     take: tuple[datetime | None, TokenTake] | None = None, full: bool = False) -> dict | None:
    """get_user's row, `revoked`, and `refs_pending`: whether pending_refs would find any of the pilot's references
    now. A list answered 304 adds none, so a sync that finds none pending has nothing to fetch.

    With `take` (the ledger's clock and a take of the pilot's list bucket, limits.SharedLimits.owner_take), the
    same statement takes that bucket's tokens for the list call when the list is due: `ledger_id` and
    `ledger_calls` are the in-flight row, both None when nothing was taken (not due, or no room)."""
    params = {"id": character_id, "now": now, "max": max_attempts}
    if take is None:
        return conn.execute(_USER_TO_SYNC_SQL + " WHERE character_id = %(id)s", params).fetchone()
    ledger_now, tokens = take
    return conn.execute(_USER_TO_SYNC_TAKING_SQL,
                        {**params, **tokens._asdict(), "ledger_now": ledger_now, "full": full}).fetchone()


def stranded_refs(conn: Connection, now: datetime, *, max_attempts: int, limit: int) -> list[dict]:
    """References with no stored killmail that no owner's sync will fetch any more: no pilot who listed them
    has a usable grant, and no corporation that listed them has a member who may still read its list. Newest
    first, at most `limit`, those whose retry time has come."""
    return conn.execute(
        f"""
        SELECT r.killmail_id, r.killmail_hash
        FROM killmail_refs r
        WHERE r.attempts < %(max)s
          AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= %(now)s)
          AND NOT EXISTS (SELECT 1 FROM killmails k WHERE k.killmail_id = r.killmail_id)
          AND NOT EXISTS (SELECT 1 FROM character_killmails l JOIN users u USING (character_id)
                          WHERE l.killmail_id = r.killmail_id AND {_LIVE_GRANT_SQL})
          AND NOT EXISTS (SELECT 1 FROM corporation_killmails l JOIN ({_ELIGIBLE_SQL}) e USING (corporation_id)
                          WHERE l.killmail_id = r.killmail_id)
        ORDER BY r.killmail_id DESC
        LIMIT %(limit)s
        """,
        {"now": now, "max": max_attempts, "limit": limit},
    ).fetchall()


def claim_refs(conn: Connection, killmail_ids: Sequence[int], now: datetime, *, seconds: int) -> list[dict]:
    """Claim references for fetching; those another live process holds, or already stored, are not returned.

    A reference another transaction has locked right now (another job claiming or releasing it) is skipped, not
    waited for: that job is the one fetching it. Two claims that waited for each other's rows, each locking in
    the order of its own plan, deadlocked when pilots who share killmails were synced at once."""
    if not killmail_ids:
        return []
    return conn.execute(
        """
        WITH free AS (
            SELECT r.killmail_id FROM killmail_refs r
            WHERE r.killmail_id = ANY(%(ids)s)
              AND (r.claimed_until IS NULL OR r.claimed_until < %(now)s OR r.claimed_by = pg_backend_pid()
                   -- a claim dies with the process that made it: a killed worker's connection is gone at once
                   OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.claimed_by))
              AND NOT EXISTS (SELECT 1 FROM killmails k WHERE k.killmail_id = r.killmail_id)
            FOR NO KEY UPDATE SKIP LOCKED)
        UPDATE killmail_refs r SET claimed_until = %(until)s, claimed_by = pg_backend_pid()
        FROM free WHERE r.killmail_id = free.killmail_id
        RETURNING r.killmail_id, r.killmail_hash
        """,
        {"ids": list(killmail_ids), "now": now, "until": now + timedelta(seconds=seconds)},
    ).fetchall()


def release_refs(conn: Connection, killmail_ids: Sequence[int]) -> None:
    """Give up claims (a job that stopped early), so the next sync may fetch them."""
    if killmail_ids:
        conn.execute(
            "UPDATE killmail_refs SET claimed_until = NULL WHERE killmail_id = ANY(%s)", (list(killmail_ids),)
        )


def record_ref_failure(conn: Connection, killmail_id: int, error: str, now: datetime, *, permanent: bool,
                       max_attempts: int) -> None:
    """Count a failed detail fetch or save; the next try waits 1, 2, 4 ... minutes (at most 6 hours), and a
    permanent failure uses up every attempt at once."""
    conn.execute(
        """
        UPDATE killmail_refs
        SET attempts = CASE WHEN %(permanent)s THEN GREATEST(attempts + 1, %(max)s) ELSE attempts + 1 END,
            last_error = %(error)s, claimed_until = NULL,
            next_attempt_at = %(now)s + make_interval(mins => LEAST(360, power(2, attempts)::int))
        WHERE killmail_id = %(id)s
        """,
        {"permanent": permanent, "max": max_attempts, "error": error[:1000], "now": now, "id": killmail_id},
    )


# ---------------------------------------------------------------------------------------------- killmails

_KILLMAIL_COLUMNS = (
    "killmail_id, killmail_hash, killmail_time, solar_system_id, moon_id, war_id, victim_character_id, "
    "victim_corporation_id, victim_alliance_id, victim_faction_id, victim_ship_type_id, victim_damage_taken, "
    "position_x, position_y, position_z, raw"
)
KILLMAIL_COLUMN_NAMES = [name.strip() for name in _KILLMAIL_COLUMNS.split(",")]
_ATTACKER_COLUMNS = (
    "killmail_id, attacker_index, character_id, corporation_id, alliance_id, faction_id, ship_type_id, "
    "weapon_type_id, damage_done, final_blow, security_status"
)
ATTACKER_COLUMN_NAMES = [name.strip() for name in _ATTACKER_COLUMNS.split(",")]
_ITEM_COLUMNS = (
    "killmail_id, item_index, parent_index, flag, item_type_id, singleton, quantity_destroyed, quantity_dropped"
)
ITEM_COLUMN_NAMES = [name.strip() for name in _ITEM_COLUMNS.split(",")]
_ATTACKER_TYPES = ["int8", "int4", "int8", "int8", "int8", "int8", "int8", "int8", "int8", "bool", "float8"]
_ITEM_TYPES = ["int8", "int4", "int4", "int4", "int8", "int4", "int8", "int8"]


def save_killmails(conn: Connection, killmails: Sequence[Any], values: Sequence[tuple | None] | None = None, *,
                   notify_max_age: int = 3600) -> list[int]:
    """Store validated killmails (killmail_model's, from parse_killmail) with attackers and items, and their
    (destroyed, dropped, total) values where given (None: not known yet); returns the new ids.

    A killmail already stored is left as it is, with its children: the insert of the parent row decides, and a
    concurrent insert of the same id waits for the other transaction, so nothing is ever stored twice. The new
    ones get their outbox rows in the same transaction (queue_notifications).
    """
    if not killmails:
        return []
    columns = list(zip(*(k.row for k in killmails), strict=True))
    worth = list(zip(*((v or (None, None, None)) for v in (values or [None] * len(killmails))), strict=True))
    # Every array is bound in binary (%b): in text, each quote of each raw body would be escaped in Python.
    inserted = conn.execute(
        f"""
        INSERT INTO killmails ({_KILLMAIL_COLUMNS}, destroyed_value, dropped_value, total_value)
        SELECT * FROM unnest(%b::bigint[], %b::text[], %b::timestamptz[], %b::bigint[], %b::bigint[],
                             %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[],
                             %b::bigint[], %b::float8[], %b::float8[], %b::float8[], %b::jsonb[],
                             %b::numeric[], %b::numeric[], %b::numeric[])
        ON CONFLICT (killmail_id) DO NOTHING
        RETURNING killmail_id
        """,
        [list(c) for c in columns[:-1]] + [[Jsonb(raw, dumps=_as_sent) for raw in columns[-1]]]
        + [list(c) for c in worth],
        binary=True,
    ).fetchall()
    new_ids = {row["killmail_id"] for row in inserted}
    with conn.cursor() as cur:
        _copy_rows(cur, "attackers", _ATTACKER_COLUMNS, _ATTACKER_TYPES,
                   (row for k in killmails if k.killmail_id in new_ids for row in k.attackers))
        _copy_rows(cur, "killmail_items", _ITEM_COLUMNS, _ITEM_TYPES,
                   (row for k in killmails if k.killmail_id in new_ids for row in k.items))
    queue_notifications(conn, sorted(new_ids), max_age=notify_max_age)
    return sorted(new_ids)


def killmails_without_value(conn: Connection, *, limit: int) -> list[dict]:
    """Lock and return up to `limit` killmails with no total_value yet (in id order): id, ship and item rows.
    Rows another transaction holds are skipped (SKIP LOCKED): two processes never value the same killmail."""
    return conn.execute(
        """
        SELECT k.killmail_id, k.victim_ship_type_id,
               coalesce((SELECT array_agg(ARRAY[i.item_type_id, i.singleton, i.quantity_destroyed,
                                                i.quantity_dropped] ORDER BY i.item_index)
                         FROM killmail_items i WHERE i.killmail_id = k.killmail_id), '{}') AS items
        FROM killmails k
        WHERE k.total_value IS NULL
        ORDER BY k.killmail_id
        LIMIT %s
        FOR UPDATE OF k SKIP LOCKED
        """,
        (limit,),
    ).fetchall()


def set_killmail_values(conn: Connection, values: Sequence[tuple[int, Any, Any, Any]]) -> None:
    """Store (killmail_id, destroyed, dropped, total) of killmails already saved."""
    if not values:
        return
    ids, destroyed, dropped, total = (list(c) for c in zip(*values, strict=True))
    conn.execute(
        """
        UPDATE killmails k SET destroyed_value = v.d, dropped_value = v.p, total_value = v.t
        FROM unnest(%s::bigint[], %s::numeric[], %s::numeric[], %s::numeric[]) AS v (id, d, p, t)
        WHERE k.killmail_id = v.id
        """,
        (ids, destroyed, dropped, total),
    )


# ---------------------------------------------------------------------------------------------- prices, names

def get_esi_cache(conn: Connection, key: str) -> dict | None:
    """The ETag and expiry stored for a public ESI route (a key such as 'markets/prices'), or None."""
    return conn.execute("SELECT etag, expires_at FROM esi_cache WHERE key = %s", (key,)).fetchone()


def save_esi_cache(conn: Connection, key: str, etag: str | None, expires_at: datetime | None) -> None:
    """Store the ETag and expiry of a public ESI route's last answer."""
    conn.execute(
        """
        INSERT INTO esi_cache (key, etag, expires_at) VALUES (%s, %s, %s)
        ON CONFLICT (key) DO UPDATE SET etag = EXCLUDED.etag, expires_at = EXCLUDED.expires_at
        """,
        (key, etag, expires_at),
    )


def save_market_prices(conn: Connection, prices: Sequence[dict], now: datetime) -> None:
    """Store ESI's market prices (its entries: type_id, average_price, adjusted_price), replacing older ones."""
    rows = [(p["type_id"], p.get("average_price"), p.get("adjusted_price")) for p in prices]
    if not rows:
        return
    type_ids, average, adjusted = (list(c) for c in zip(*rows, strict=True))
    conn.execute(
        """
        INSERT INTO market_prices (type_id, average_price, adjusted_price, fetched_at)
        SELECT t, a, j, %s FROM unnest(%s::integer[], %s::numeric[], %s::numeric[]) AS p (t, a, j)
        ON CONFLICT (type_id) DO UPDATE SET average_price = EXCLUDED.average_price,
            adjusted_price = EXCLUDED.adjusted_price, fetched_at = EXCLUDED.fetched_at
        """,
        (now, type_ids, average, adjusted),
    )


def market_prices(conn: Connection) -> dict[int, Decimal]:
    """Each type's price: its average price, else its adjusted price, else 0."""
    rows = conn.execute(
        "SELECT type_id, coalesce(average_price, adjusted_price, 0) AS price FROM market_prices").fetchall()
    return {r["type_id"]: r["price"] for r in rows}


def names_to_resolve(conn: Connection, ids: Iterable[int], now: datetime) -> list[int]:
    """Of these ids, those with no name stored and not known to be unknown (until a day after ESI said so)."""
    rows = conn.execute(
        """
        SELECT i.id FROM unnest(%s::bigint[]) AS i (id)
        LEFT JOIN names n USING (id)
        WHERE n.id IS NULL OR (n.name IS NULL AND coalesce(n.unknown_until, '-infinity') <= %s)
        ORDER BY i.id
        """,
        (sorted(set(ids)), now),
    ).fetchall()
    return [r["id"] for r in rows]


def save_names(conn: Connection, names: Sequence[dict], unknown: Sequence[int], now: datetime, *, unknown_for: timedelta
               ) -> None:
    """Store resolved names (ESI's entries: id, category, name) and remember ids ESI could not resolve.

    One statement, its rows in id order: processes naming overlapping ids at once (pilots who share killmails)
    lock the rows in one order, and never each hold a row the other waits for. Rows in ESI's order deadlocked."""
    rows = {i: (None, None) for i in unknown}
    rows.update((n["id"], (n.get("category"), n["name"])) for n in names)
    if not rows:
        return
    ids = sorted(rows)
    conn.execute(
        """
        INSERT INTO names AS o (id, category, name, resolved_at, unknown_until)
        SELECT i, c, n, CASE WHEN n IS NOT NULL THEN %(now)s::timestamptz END,
               CASE WHEN n IS NULL THEN %(until)s::timestamptz END
        FROM unnest(%(ids)s::bigint[], %(categories)s::text[], %(names)s::text[]) AS u (i, c, n)
        ORDER BY i
        ON CONFLICT (id) DO UPDATE SET
            category = CASE WHEN EXCLUDED.name IS NULL THEN o.category ELSE EXCLUDED.category END,
            name = COALESCE(EXCLUDED.name, o.name),
            resolved_at = CASE WHEN EXCLUDED.name IS NULL THEN o.resolved_at ELSE EXCLUDED.resolved_at END,
            unknown_until = EXCLUDED.unknown_until
        """,
        {"now": now, "until": now + unknown_for, "ids": ids, "categories": [rows[i][0] for i in ids],
         "names": [rows[i][1] for i in ids]},
    )


# ESI's id ranges: solar systems (New Eden's, wormholes', Abyssal deadspace's) are 30 000 000 to 32 999 999.
SYSTEM_IDS = range(30_000_000, 33_000_000)


def systems_to_locate(conn: Connection, ids: Iterable[int]) -> list[int]:
    """Of these ids, the systems whose region was not looked up yet."""
    rows = conn.execute(
        """
        SELECT i.id FROM unnest(%s::bigint[]) AS i (id)
        WHERE NOT EXISTS (SELECT 1 FROM system_regions s WHERE s.system_id = i.id)
        ORDER BY i.id
        """,
        (sorted({i for i in ids if i in SYSTEM_IDS}),),
    ).fetchall()
    return [r["id"] for r in rows]


def save_system_region(conn: Connection, system_id: int, region_id: int | None, now: datetime) -> None:
    """Store a system's region, None for one ESI knows no region of (once: systems never move)."""
    conn.execute("INSERT INTO system_regions (system_id, region_id, located_at) VALUES (%s, %s, %s) "
                 "ON CONFLICT (system_id) DO NOTHING", (system_id, region_id, now))


def regions_of(conn: Connection, system_ids: Iterable[int]) -> dict[int, int]:
    """The stored region of each of these systems (those not located yet are left out)."""
    rows = conn.execute("SELECT system_id, region_id FROM system_regions "
                        "WHERE system_id = ANY(%s) AND region_id IS NOT NULL",
                        (sorted({i for i in system_ids if i is not None}),)).fetchall()
    return {r["system_id"]: r["region_id"] for r in rows}


def names_of(conn: Connection, ids: Iterable[int]) -> dict[int, str]:
    """The stored names of these ids (unknown ones are left out)."""
    rows = conn.execute("SELECT id, name FROM names WHERE id = ANY(%s) AND name IS NOT NULL",
                        (sorted({i for i in ids if i is not None}),)).fetchall()
    return {r["id"]: r["name"] for r in rows}


# A kill: one of the webhook's characters or corporations among the attackers; a loss: one of them the victim.
# zKillboard takes every killmail, however old.
_WEBHOOK_WANTS = """
    (w.format = 'zkillboard'
     OR (cardinality(w.character_ids) = 0 AND cardinality(w.corporation_ids) = 0)
     OR (w.losses AND (k.victim_character_id = ANY (w.character_ids)
                       OR k.victim_corporation_id = ANY (w.corporation_ids)))
     OR (w.kills AND EXISTS (SELECT 1 FROM attackers a WHERE a.killmail_id = k.killmail_id
                             AND (a.character_id = ANY (w.character_ids)
                                  OR a.corporation_id = ANY (w.corporation_ids)))))
    AND (w.min_value IS NULL OR k.total_value >= w.min_value)
    AND (w.format = 'zkillboard' OR k.killmail_time > now() - make_interval(secs => %(max_age)s))
"""


def queue_notifications(conn: Connection, killmail_ids: Sequence[int], *, max_age: int,
                        valued_late: bool = False) -> int:
    """Write an outbox row for each enabled destination that wants each of these (newly stored) killmails.

    Killmails older than max_age seconds (from their killmail_time) are announced nowhere but on zKillboard (a
    first sync or a backfill would flood a channel). valued_late: these killmails were stored without a value
    and just got one; only the destinations with a minimum value can want them now (the others got their rows
    when they were stored). Without an enabled webhook this is one look at a tiny table.
    """
    if not killmail_ids or not one_row(
            conn.execute("SELECT EXISTS (SELECT 1 FROM webhooks WHERE enabled) AS any"))["any"]:
        return 0
    return conn.execute(
        f"""
        INSERT INTO outbox (webhook_id, killmail_id)
        SELECT w.id, k.killmail_id
        FROM killmails k JOIN webhooks w ON w.enabled AND w.refused IS NULL
        WHERE k.killmail_id = ANY (%(ids)s) AND {_WEBHOOK_WANTS}
          AND (NOT %(valued_late)s OR w.min_value IS NOT NULL)
        ON CONFLICT (webhook_id, killmail_id) DO NOTHING
        """,
        {"ids": list(killmail_ids), "max_age": max_age, "valued_late": valued_late},
    ).rowcount


def _as_sent(text: str) -> str:
    """A raw body is already JSON text: psycopg sends it as it is instead of serialising it again."""
    return text


def _copy_rows(cur: psycopg.Cursor[DictRow], table: str, columns: str, types: list[str], rows: Iterable[tuple]) -> None:
    """COPY rows into a table in PostgreSQL's binary format (no text to format here or to parse there)."""
    with cur.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row(row)


# ---------------------------------------------------------------------------------------------- notifications


def add_webhook(conn: Connection, name: str, url: str, *, format: str = "discord", character_ids: Sequence[int] = (),
                corporation_ids: Sequence[int] = (), kills: bool = True, losses: bool = True,
                min_value: float | None = None) -> int:
    """Add a destination (or replace the one of that name, enabled and no longer refused); returns its id."""
    return one_row(conn.execute(
        """
        INSERT INTO webhooks (name, url, format, character_ids, corporation_ids, kills, losses, min_value)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url, format = EXCLUDED.format,
            character_ids = EXCLUDED.character_ids, corporation_ids = EXCLUDED.corporation_ids,
            kills = EXCLUDED.kills, losses = EXCLUDED.losses, min_value = EXCLUDED.min_value,
            enabled = true, refused = NULL, paused_until = NULL
        RETURNING id
        """,
        (name, url, format, list(character_ids), list(corporation_ids), kills, losses, min_value),
    ))["id"]


def keep_webhook(conn: Connection, name: str, url: str, *, format: str, enabled: bool) -> None:
    """Add a destination without filters, or set its URL and whether it is enabled, keeping a refusal."""
    conn.execute(
        "INSERT INTO webhooks (name, url, format, enabled) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url, format = EXCLUDED.format, enabled = EXCLUDED.enabled",
        (name, url, format, enabled),
    )


def set_webhook_enabled(conn: Connection, name: str, enabled: bool) -> None:
    """Enable or disable a destination by name."""
    conn.execute("UPDATE webhooks SET enabled = %s WHERE name = %s", (enabled, name))


def list_webhooks(conn: Connection) -> list[dict]:
    """Every destination, with its outbox counts."""
    return conn.execute(
        """
        SELECT w.*, count(o.id) FILTER (WHERE o.delivered_at IS NULL AND o.next_attempt_at IS NOT NULL) AS pending,
               count(o.id) FILTER (WHERE o.delivered_at IS NOT NULL) AS delivered,
               count(o.id) FILTER (WHERE o.delivered_at IS NULL AND o.next_attempt_at IS NULL) AS failed
        FROM webhooks w LEFT JOIN outbox o ON o.webhook_id = w.id
        GROUP BY w.id ORDER BY w.name
        """
    ).fetchall()


def get_webhook(conn: Connection, name: str) -> dict | None:
    """One destination by name."""
    return conn.execute("SELECT * FROM webhooks WHERE name = %s", (name,)).fetchone()


# The ids a post and the API show by name, as the columns of notification_killmail (and of the API's rows).
NAMED_COLUMNS = ("solar_system_id", "victim_character_id", "victim_corporation_id", "victim_alliance_id",
                 "victim_ship_type_id", "final_blow_character_id", "final_blow_corporation_id",
                 "final_blow_ship_type_id")
_FINAL_BLOW_SQL = """
    LEFT JOIN LATERAL (SELECT a.character_id, a.corporation_id, a.ship_type_id FROM attackers a
                       WHERE a.killmail_id = k.killmail_id AND a.final_blow
                       ORDER BY a.attacker_index LIMIT 1) f ON true
"""


def notification_killmail(conn: Connection, killmail_id: int | None = None) -> dict | None:
    """What a post says about a killmail (the latest stored one without an id): its facts, its final blow, its
    attacker count, and the characters and corporations among its attackers (whose kill it is)."""
    return conn.execute(
        f"""
        SELECT k.killmail_id, k.killmail_hash, k.killmail_time, k.solar_system_id, k.victim_character_id,
               k.victim_corporation_id, k.victim_alliance_id, k.victim_ship_type_id, k.total_value,
               f.character_id AS final_blow_character_id, f.corporation_id AS final_blow_corporation_id,
               f.ship_type_id AS final_blow_ship_type_id,
               (SELECT count(*) FROM attackers a WHERE a.killmail_id = k.killmail_id) AS attackers,
               ARRAY(SELECT DISTINCT a.character_id FROM attackers a WHERE a.killmail_id = k.killmail_id
                     AND a.character_id IS NOT NULL) AS attacker_character_ids,
               ARRAY(SELECT DISTINCT a.corporation_id FROM attackers a WHERE a.killmail_id = k.killmail_id
                     AND a.corporation_id IS NOT NULL) AS attacker_corporation_ids
        FROM killmails k {_FINAL_BLOW_SQL}
        WHERE %(id)s::bigint IS NULL OR k.killmail_id = %(id)s
        ORDER BY k.stored_at DESC, k.killmail_id DESC LIMIT 1
        """,
        {"id": killmail_id},
    ).fetchone()


# Every id a post shows (NAMED_COLUMNS, and its system's region) was looked up by name (named, or known to have
# none), and the system, where ESI named it as one, was looked up for its region, for outbox row o.
_NAMES_LOOKED_UP = f"""
    (NOT EXISTS (SELECT 1 FROM killmails k {_FINAL_BLOW_SQL}
                LEFT JOIN system_regions s ON s.system_id = k.solar_system_id
                CROSS JOIN LATERAL unnest(ARRAY[k.solar_system_id, k.victim_character_id, k.victim_corporation_id,
                                                k.victim_alliance_id, k.victim_ship_type_id, f.character_id,
                                                f.corporation_id, f.ship_type_id, s.region_id]) AS shown (id)
                WHERE k.killmail_id = o.killmail_id AND shown.id IS NOT NULL
                  AND NOT EXISTS (SELECT 1 FROM names n WHERE n.id = shown.id))
    AND NOT EXISTS (SELECT 1 FROM killmails k JOIN names n ON n.id = k.solar_system_id
                    WHERE k.killmail_id = o.killmail_id AND n.category = 'solar_system'
                      AND NOT EXISTS (SELECT 1 FROM system_regions s WHERE s.system_id = k.solar_system_id)))
"""


def claim_notification(conn: Connection, now: datetime, *, name_wait: float = 30.0) -> dict | None:
    """Lock the next due outbox row of a destination that is not paused (SKIP LOCKED: senders share the work),
    once the ids its post shows are named, or name_wait seconds after the row was written if they never are
    (zKillboard's posts show no names: they go at once).

    The row stays locked until the caller's transaction ends: a sender that dies releases it at once.
    """
    return conn.execute(
        f"""
        SELECT o.id, o.attempts, o.killmail_id, w.id AS webhook_id, w.name, w.url, w.format, w.character_ids,
               w.corporation_ids
        FROM outbox o JOIN webhooks w ON w.id = o.webhook_id
        WHERE o.delivered_at IS NULL AND o.next_attempt_at <= %(now)s AND w.enabled AND w.refused IS NULL
          AND (w.paused_until IS NULL OR w.paused_until <= %(now)s)
          AND (w.format = 'zkillboard' OR o.created_at <= %(now)s - make_interval(secs => %(wait)s)
               OR {_NAMES_LOOKED_UP})
        ORDER BY o.next_attempt_at, o.id
        LIMIT 1
        FOR UPDATE OF o SKIP LOCKED
        """,
        {"now": now, "wait": name_wait},
    ).fetchone()


def mark_delivered(conn: Connection, outbox_id: int, now: datetime) -> None:
    """An outbox row was posted."""
    conn.execute("UPDATE outbox SET delivered_at = %s, attempts = attempts + 1, last_error = NULL WHERE id = %s",
                 (now, outbox_id))


def retry_notification(conn: Connection, outbox_id: int, error: str, retry_at: datetime | None, *,
                       counted: bool = True) -> None:
    """An attempt failed: try again at retry_at, or never (None: given up, the error kept)."""
    conn.execute(
        "UPDATE outbox SET attempts = attempts + %s, next_attempt_at = %s, last_error = %s WHERE id = %s",
        (1 if counted else 0, retry_at, error[:1000], outbox_id),
    )


def pause_webhook(conn: Connection, webhook_id: int, until: datetime) -> None:
    """Hold every post to a destination until then (its 429, or a pace it asks for)."""
    conn.execute("UPDATE webhooks SET paused_until = GREATEST(paused_until, %s) WHERE id = %s", (until, webhook_id))


def refuse_webhook(conn: Connection, webhook_id: int, reason: str) -> None:
    """The destination refused us: stop sending to it until an operator adds it again."""
    conn.execute("UPDATE webhooks SET refused = %s WHERE id = %s", (reason[:300], webhook_id))


def prune_outbox(conn: Connection, now: datetime, *, keep_days: int) -> int:
    """Delete outbox rows delivered or given up more than keep_days ago; returns how many.

    Safe at any age: rows are written only for newly stored killmails, never again for the same one.
    """
    return conn.execute(
        "DELETE FROM outbox WHERE (delivered_at < %(cut)s) "
        "OR (delivered_at IS NULL AND next_attempt_at IS NULL AND created_at < %(cut)s)",
        {"cut": now - timedelta(days=keep_days)},
    ).rowcount


def outbox_summary(conn: Connection, now: datetime) -> dict:
    """The status page's outbox panel: pending, delivered in 24 h, failed, and the refused destinations."""
    counts = one_row(conn.execute(
        """
        SELECT count(*) FILTER (WHERE delivered_at IS NULL AND next_attempt_at IS NOT NULL) AS pending,
               count(*) FILTER (WHERE delivered_at > %s - interval '24 hours') AS delivered_24h,
               count(*) FILTER (WHERE delivered_at IS NULL AND next_attempt_at IS NULL) AS failed
        FROM outbox
        """,
        (now,),
    ))
    refused = conn.execute("SELECT name, refused FROM webhooks WHERE refused IS NOT NULL ORDER BY name").fetchall()
    return {**counts, "refused": refused}


# ---------------------------------------------------------------------------------------------- ESI limits


def limit_state(conn: Connection, buckets: Sequence[str], *, paused_per_owner_at: datetime | None = None) -> list[dict]:
    """The shared state of these buckets (missing ones have no row); with paused_per_owner_at, also every
    per-character bucket (named '<group>:<character id>') paused beyond that time."""
    return conn.execute(
        f"SELECT * FROM esi_limits WHERE bucket = ANY(%s) "
        f"OR ({_OWNER_GROUP_SQL} = ANY(%s) AND paused_until > %s)",
        (list(buckets), list(OWNER_BUCKET_GROUPS), paused_per_owner_at),
    ).fetchall()


def record_limit(conn: Connection, bucket: str, *, limit_tokens: int | None, window_seconds: int | None,
                 remaining: int | None, paused_until: datetime | None, status: int | None) -> None:
    """Store what a response said about a bucket; a pause only ever extends."""
    conn.execute(
        """
        INSERT INTO esi_limits (bucket, limit_tokens, window_seconds, remaining, paused_until, last_status,
                                updated_at)
        VALUES (%(bucket)s, %(limit)s, %(window)s, %(remaining)s, %(paused)s, %(status)s, now())
        ON CONFLICT (bucket) DO UPDATE SET
            limit_tokens = COALESCE(EXCLUDED.limit_tokens, esi_limits.limit_tokens),
            window_seconds = COALESCE(EXCLUDED.window_seconds, esi_limits.window_seconds),
            remaining = COALESCE(EXCLUDED.remaining, esi_limits.remaining),
            paused_until = GREATEST(esi_limits.paused_until, EXCLUDED.paused_until),
            last_status = COALESCE(EXCLUDED.last_status, esi_limits.last_status),
            updated_at = now()
        """,
        {"bucket": bucket, "limit": limit_tokens, "window": window_seconds, "remaining": remaining,
         "paused": paused_until, "status": status},
    )


class TokenTake(NamedTuple):
    """What a call takes from a rate-limit bucket of the ledger (schema.sql's esi_take_tokens): `cost` held while
    in flight and `headroom` kept beside it, under the bucket's `limit` a `window`, leaving `floor` unspent and
    `reserve` while other apps spend it; `calls` asks for a lease of that many calls' worth in one row, handed
    out for `life` seconds."""

    bucket: str
    cost: int
    headroom: int
    limit: int
    window: int
    floor: int
    reserve: int
    calls: int = 1
    life: int = 0


class SlotTake(NamedTuple):
    """What a call takes from the error budget (schema.sql's esi_take_errors): one slot, an error it may turn
    into, under `limit` errors a `window`, leaving `floor` (`calm_floor` after a window without errors); a row
    counts `hold` seconds at most; `slots` asks for a lease of that many in one row."""

    bucket: str
    limit: int
    window: int
    hold: int
    floor: int
    calm_floor: int
    slots: int = 1


class Taken(NamedTuple):
    """The ledger's answer to a take: the in-flight row and how many calls it holds, or no row and the seconds
    until the call would fit."""

    id: int | None
    calls: int
    wait: float


def take_tokens(conn: Connection, now: datetime | None, take: TokenTake, *, poll: float) -> Taken:
    """Take rate-limit tokens for one call, or a lease of up to `take.calls` (schema.sql's esi_take_tokens);
    `poll` is the wait while calls in flight are about to give enough back; `now` None is the database's clock."""
    return _take(conn, "esi_take_tokens(%(now)s, %(bucket)s, p_calls => %(calls)s, p_cost => %(cost)s, "
                       "p_headroom => %(headroom)s, p_limit => %(limit)s, p_window => %(window)s, p_life => %(life)s, "
                       "p_floor => %(floor)s, p_reserve => %(reserve)s, p_poll => %(poll)s)", now, take, poll)


def take_error_slots(conn: Connection, now: datetime | None, take: SlotTake, *, poll: float) -> Taken:
    """Take error slots for one call, or a lease of up to `take.slots` (schema.sql's esi_take_errors)."""
    return _take(conn, "esi_take_errors(%(now)s, %(bucket)s, p_slots => %(slots)s, p_limit => %(limit)s, "
                       "p_window => %(window)s, p_hold => %(hold)s, p_floor => %(floor)s, "
                       "p_calm_floor => %(calm_floor)s, p_poll => %(poll)s)", now, take, poll)


def _take(conn: Connection, call: str, now: datetime | None, take: TokenTake | SlotTake, poll: float) -> Taken:
    row = one_row(conn.execute(f"SELECT * FROM {call}", {**take._asdict(), "now": now, "poll": poll}))
    id_, calls, wait = row.values()
    return Taken(id_, calls or 0, wait or 0.0)


class Booking(NamedTuple):
    """What one answer cost a bucket (`window` its window), to book: `used` is ESI's own count of the bucket where
    the answer gave it, `ago` the seconds between the answer and the settling (0: now)."""

    bucket: str
    cost: int
    window: int
    used: int | None = None
    ago: float = 0.0


class Settlement(NamedTuple):
    """In-flight rows to end and answers to book (esi_settle), on the ledger's clock (None: the database's)."""

    now: datetime | None
    ids: Sequence[int]
    bookings: Sequence[Booking]


_SETTLE_CALL = ("esi_settle(%(settle_now)s, %(ids)s::bigint[], %(buckets)s::text[], %(costs)s::int[], "
                "%(windows)s::int[], %(used)s::int[], %(ago)s::float8[])")


def _settle_params(settlement: Settlement) -> dict:
    columns = [list(column) for column in zip(*settlement.bookings, strict=True)] or [[]] * len(Booking._fields)
    return {"settle_now": settlement.now, "ids": list(settlement.ids),
            **dict(zip(("buckets", "costs", "windows", "used", "ago"), columns, strict=True))}


def settle_tokens(conn: Connection, now: datetime | None, *, ids: Sequence[int], bookings: Sequence[Booking]) -> None:
    """End these in-flight rows and book what the answers cost, each in the second after it came (schema.sql's
    esi_settle); ESI's own counts book what other apps spent."""
    conn.execute(f"SELECT {_SETTLE_CALL}", _settle_params(Settlement(now, ids, bookings)))


def prune_ledger(conn: Connection, *, older_than: int) -> int:
    """Delete ledger rows older than this many seconds (buckets nobody calls any more: a pilot gone, an old
    egress name; esi_take_calls prunes the buckets in use); returns how many went."""
    cut = "clock_timestamp() - make_interval(secs => %s)"
    spent = conn.execute(f"DELETE FROM esi_spent WHERE second < {cut}", (older_than,)).rowcount
    flying = conn.execute(f"DELETE FROM esi_in_flight WHERE sent_at < {cut}", (older_than,)).rowcount
    return spent + flying


# ---------------------------------------------------------------------------------------------- runs


_RUN_COLUMNS = """
    INSERT INTO sync_runs (character_id, corporation_id, kind, started_at, finished_at, status, listed, new,
                           saved, skipped, failed, esi_calls, attempt, worker, error)
"""
_RUN_VALUES = """
    %(character_id)s, %(corporation_id)s, %(kind)s, %(started_at)s, %(finished_at)s, %(status)s,
    %(listed)s, %(new)s, %(saved)s, %(skipped)s, %(failed)s, %(esi_calls)s, %(attempt)s, %(worker)s, %(error)s
"""
_INSERT_RUN_SQL = f"{_RUN_COLUMNS} VALUES ({_RUN_VALUES})"
_ADD_ESI_CALLS_SQL = """
    INSERT INTO esi_calls (route_group, status, calls)
    SELECT * FROM unnest(%(groups)s::text[], %(statuses)s::int[], %(calls)s::bigint[])
    ON CONFLICT (route_group, status) DO UPDATE SET calls = esi_calls.calls + EXCLUDED.calls
"""


def record_run(conn: Connection, run: dict) -> None:
    """Insert one sync_runs row."""
    conn.execute(_INSERT_RUN_SQL, run)


def add_esi_calls(conn: Connection, counts: dict[tuple[str, int], int]) -> None:
    """Add a job's ESI calls, by route group and status, to the running totals."""
    if counts:
        conn.execute(_ADD_ESI_CALLS_SQL, _calls_columns(counts))


def _calls_columns(counts: dict[tuple[str, int], int]) -> dict[str, list]:
    ordered = sorted(counts.items())  # one order for every process: upserts of several rows never deadlock
    return {"groups": [g for (g, _), _ in ordered], "statuses": [s for (_, s), _ in ordered],
            "calls": [n for _, n in ordered]}


# record_outcome's statement for each kind of owner, without and with a settlement of the ledger, composed once at
# import rather than again for every run. The run row is inserted from the settlement's row: a CTE that is only
# a SELECT runs when the statement reads it.
_OUTCOME_SQL = {
    (kind, settles): sql.SQL("WITH {} state AS ({}), calls AS ({}) {}").format(
        sql.SQL(f"settled AS (SELECT {_SETTLE_CALL})," if settles else ""),
        sql.SQL(_FINISH_SQL).format(sql.Identifier(table), sql.Identifier(column)), sql.SQL(_ADD_ESI_CALLS_SQL),
        sql.SQL(f"{_RUN_COLUMNS} SELECT {_RUN_VALUES} FROM settled" if settles else _INSERT_RUN_SQL)).as_string()
    for kind, (table, column) in _STATE_TABLES.items() for settles in (False, True)}


def record_outcome(conn: Connection, run: dict, calls: dict[tuple[str, int], int], *, found_new: bool,
                   list_cache: tuple[str | None, datetime | None] | None = None,
                   settlement: Settlement | None = None) -> None:
    """A run's end in one statement: its sync_runs row, its ESI calls added to the totals, and its pilot's (or
    corporation's) sync state as finish_sync leaves it, with the list's ETag and Expires when the run read them
    and nothing else wrote them (list_cache); with `settlement`, the ledger rows its opening statement took
    ended and its answers booked (esi_settle)."""
    etag, expires_at = list_cache or (None, None)
    conn.execute(
        _OUTCOME_SQL[run["kind"], settlement is not None],
        {**run, **_calls_columns(calls), "found_new": found_new, "cached": list_cache is not None, "etag": etag,
         "expires_at": expires_at,
         "owner_id": run["corporation_id"] if run["kind"] == "corporation" else run["character_id"],
         **(_settle_params(settlement) if settlement is not None else {})},
    )


# ---------------------------------------------------------------------------------------------- status page

# Read-only queries of the web app (web/). None of them selects a token column; times come back as timestamptz.

USER_STATES = ("active", "due", "queued", "never_synced", "needs_relogin")

_NEEDS_RELOGIN_SQL = f"NOT {_LIVE_GRANT_SQL}"


def ping(conn: Connection) -> None:
    """Run a trivial query, to show the database answers."""
    conn.execute("SELECT 1").fetchone()


JOB_SEEN_WITHIN = 60  # seconds: a worker_jobs row not written again within this is a dead process's


def report_job(conn: Connection, worker: str, character_id: int, *, started_at: datetime,
               progress_at: datetime) -> None:
    """Write a worker process's job in hand and its last progress; rows of dead processes go."""
    conn.execute(
        """
        INSERT INTO worker_jobs (worker, character_id, started_at, progress_at, seen_at)
        VALUES (%(worker)s, %(character)s, %(started)s, %(progress)s, now())
        ON CONFLICT (worker) DO UPDATE SET character_id = EXCLUDED.character_id, started_at = EXCLUDED.started_at,
            progress_at = EXCLUDED.progress_at, seen_at = now()
        """,
        {"worker": worker, "character": character_id, "started": started_at, "progress": progress_at})
    conn.execute("DELETE FROM worker_jobs WHERE seen_at < now() - make_interval(secs => %s)", (JOB_SEEN_WITHIN * 10,))


def end_job_report(conn: Connection, worker: str) -> None:
    """A worker process's job ended: its row goes."""
    conn.execute("DELETE FROM worker_jobs WHERE worker = %s", (worker,))


def job_health(conn: Connection, now: datetime, *, stall_after: int, stale_claim_after: int) -> dict:
    """Jobs in hand of live worker processes, the age of the oldest (seconds), those with no progress for
    `stall_after` seconds, and pilots or corporations claimed for a queue longer than `stale_claim_after`."""
    return one_row(conn.execute(
        """
        SELECT count(*) AS in_progress,
               coalesce(max(extract(epoch FROM %(now)s - started_at)), 0)::float8 AS oldest_seconds,
               count(*) FILTER (WHERE progress_at < %(now)s - make_interval(secs => %(stall)s)) AS stalled,
               (SELECT count(*) FROM users WHERE queued_at < %(now)s - make_interval(secs => %(stale)s))
             + (SELECT count(*) FROM corporations WHERE queued_at < %(now)s - make_interval(secs => %(stale)s))
                   AS stale_claims
        FROM worker_jobs WHERE seen_at >= %(now)s - make_interval(secs => %(seen)s)
        """,
        {"now": now, "stall": stall_after, "stale": stale_claim_after, "seen": JOB_SEEN_WITHIN},
    ))


def latest_run(conn: Connection) -> dict | None:
    """The most recently finished run's start, end and duration in seconds; None before the first run."""
    return conn.execute(
        """
        SELECT started_at, finished_at, extract(epoch FROM finished_at - started_at)::float8 AS duration
        FROM sync_runs WHERE finished_at IS NOT NULL
        ORDER BY finished_at DESC LIMIT 1
        """
    ).fetchone()


class RunFigures(NamedTuple):
    """The runs of a day, read in one pass (run_figures)."""
    stats: dict         # runs, succeeded, failed, avg_duration, p95_duration: over every run of the window
    hours: list[dict]   # hour, runs ({status: count}), p50, p95: a row for each charted hour with runs in it


def run_figures(conn: Connection, since: datetime, first_hour: datetime, until: datetime) -> RunFigures:
    """Runs finished since `since`, read once for the status page and its charts. Skips of a locked character
    ('locked') synced nothing and are left out.

    - stats: how many, how many succeeded (ok, partial) or failed (error), their average duration and its 95th
      percentile in seconds.
    - hours: the runs finished from `first_hour` until `until` by hour (each row's `hour` is the start of its
      hour, counted in whole hours from `first_hour`): their count by status, and the median and 95th percentile
      of their durations in seconds (interpolated between the two nearest runs). An hour with no run has no row.

    `first_hour` is at or after `since`, so each hour charted is whole within the window.
    """
    if first_hour < since:
        raise ValueError("the first hour charted starts before the window read")
    # Each status is counted by a column of its own (every status ever recorded, from the counters), so the runs
    # are grouped only by hour: a grouping by hour and status too would sort them once more and work out
    # percentiles nobody reads. A status recorded for the first time since the counters were read shows as
    # uncounted runs, and the figures are read again with it.
    for _ in range(3):
        statuses = [row["status"] for row in runs_by_status(conn) if row["status"] != "locked"]
        rows = conn.execute(_run_figures_sql(statuses), {"since": since, "first": first_hour}).fetchall()
        if all(row["runs"] == sum(row["by_status"]) for row in rows):
            break
    whole = next(row for row in rows if row["whole"])
    counted = dict(zip(statuses, whole["by_status"], strict=True))
    stats = {"runs": whole["runs"], "succeeded": counted.get("ok", 0) + counted.get("partial", 0),
             "failed": counted.get("error", 0), "avg_duration": whole["avg_duration"],
             "p95_duration": whole["durations"][1] if whole["durations"] else None}
    hours = [{"hour": row["hour"], "runs": {s: n for s, n in zip(statuses, row["by_status"], strict=True) if n},
              "p50": row["durations"][0], "p95": row["durations"][1]}
             for row in rows if not row["whole"] and first_hour <= row["hour"] < until]
    return RunFigures(stats, sorted(hours, key=lambda hour: hour["hour"]))


def _run_figures_sql(statuses: Sequence[str]) -> sql.Composed:
    """run_figures' statement for these statuses: one pass over the runs of the window, by hour and over all.

    The percentiles sort date_part's float8 seconds: the same values as extract's numeric cast to float8 (both the
    exact microseconds, correctly rounded), without a numeric conversion a row. The average divides the exact sum
    of the durations in seconds by their number, as avg over extract's numeric does (the same sum, scale and
    division)."""
    by_status = sql.SQL(", ").join(sql.SQL("count(*) FILTER (WHERE status = {})").format(sql.Literal(status))
                                   for status in statuses)
    return sql.SQL("""
        SELECT hour, GROUPING(hour) = 1 AS whole, count(*) AS runs, ARRAY[{by_status}]::bigint[] AS by_status,
               (extract(epoch FROM sum(duration)) / nullif(count(*), 0))::float8 AS avg_duration,
               percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY date_part('epoch', duration)) AS durations
        FROM (SELECT date_bin('1 hour', finished_at, %(first)s) AS hour, status, finished_at - started_at AS duration
              FROM sync_runs WHERE finished_at >= %(since)s AND status <> 'locked') r
        GROUP BY ROLLUP (hour)
        """).format(by_status=by_status)


def runs_by_status(conn: Connection) -> list[dict]:
    """Every run recorded so far, counted by status (from the counters schema.sql's triggers keep)."""
    return conn.execute(
        """
        SELECT substr(counter, length('sync_runs:') + 1) AS status, sum(n)::bigint AS runs
        FROM row_counts WHERE starts_with(counter, 'sync_runs:')
        GROUP BY counter HAVING sum(n) <> 0 ORDER BY status
        """
    ).fetchall()


def killmail_growth(conn: Connection, now: datetime) -> dict:
    """Stored killmails: in all (from the counter schema.sql's triggers keep), and stored in the last hour and the
    last 24 hours (from the index on stored_at)."""
    return one_row(conn.execute(
        """
        SELECT (SELECT coalesce(sum(n), 0)::bigint FROM row_counts WHERE counter = 'killmails') AS total,
               count(*) FILTER (WHERE stored_at >= %(now)s - interval '1 hour') AS last_hour,
               count(*) AS last_day
        FROM killmails WHERE stored_at >= %(now)s - interval '24 hours'
        """,
        {"now": now},
    ))


def isk_last_day(conn: Connection, now: datetime) -> dict:
    """ISK of the killmails of the last 24 hours (by killmail_time): `lost` where the victim is one of the users,
    `destroyed` the rest (what the users and their corporations killed). Killmails not valued yet count 0."""
    return one_row(conn.execute(
        """
        SELECT coalesce(sum(k.total_value) FILTER (WHERE u.character_id IS NULL), 0) AS destroyed,
               coalesce(sum(k.total_value) FILTER (WHERE u.character_id IS NOT NULL), 0) AS lost
        FROM killmails k
        LEFT JOIN users u ON u.character_id = k.victim_character_id
        WHERE k.killmail_time >= %(now)s - interval '24 hours'
        """,
        {"now": now},
    ))


# The hourly charts: each row's `hour` is the start of its hour, counted in whole hours from `since`, which the
# caller puts on a clock hour. An hour with nothing in it has no row.

def killmails_per_hour(conn: Connection, since: datetime, until: datetime) -> list[dict]:
    """Killmails stored from `since` until `until`, counted by hour."""
    return conn.execute(
        """
        SELECT date_bin('1 hour', stored_at, %(since)s) AS hour, count(*) AS killmails
        FROM killmails WHERE stored_at >= %(since)s AND stored_at < %(until)s
        GROUP BY 1 ORDER BY 1
        """,
        {"since": since, "until": until},
    ).fetchall()


def detail_backlog(conn: Connection, *, max_attempts: int) -> dict[str, int]:
    """References with no stored killmail: `pending` (attempts left) and `gave_up` (every attempt used), from the
    counters schema.sql's triggers keep by attempts."""
    return one_row(conn.execute(
        f"""
        SELECT coalesce(sum(n) FILTER (WHERE {_ATTEMPTS_SQL} < %(max)s), 0)::bigint AS pending,
               coalesce(sum(n) FILTER (WHERE {_ATTEMPTS_SQL} >= %(max)s), 0)::bigint AS gave_up
        FROM row_counts WHERE starts_with(counter, 'unstored_refs:')
        """,
        {"max": max_attempts},
    ))


_ATTEMPTS_SQL = "substr(counter, length('unstored_refs:') + 1)::int"  # an unstored_refs counter's attempts


def user_states(conn: Connection, now: datetime, *, interval: int, stale_after: int) -> dict[str, int]:
    """Users counted by state, each user in one: needs_relogin, else queued, else never_synced, else due, else
    active (synced within its interval). A claim older than stale_after no longer counts as queued."""
    rows = conn.execute(
        f"""
        SELECT CASE WHEN {_NEEDS_RELOGIN_SQL} THEN 'needs_relogin'
                    WHEN queued_at >= %(now)s - make_interval(secs => %(stale)s) THEN 'queued'
                    WHEN last_sync_at IS NULL THEN 'never_synced'
                    WHEN {_DUE_SQL} THEN 'due'
                    ELSE 'active' END AS state,
               count(*) AS users
        FROM users GROUP BY 1
        """,
        {"now": now, "interval": interval, "stale": stale_after},
    ).fetchall()
    counts = dict.fromkeys(USER_STATES, 0)
    counts.update((row["state"], row["users"]) for row in rows)
    return counts


def recent_runs(conn: Connection, *, limit: int) -> list[dict]:
    """The latest runs, newest first, with the pilot's name and the duration in seconds."""
    return conn.execute(
        """
        SELECT r.id, r.character_id, u.character_name, r.kind, r.status, r.started_at, r.finished_at,
               extract(epoch FROM r.finished_at - r.started_at)::float8 AS duration, r.listed, r.new, r.saved,
               r.skipped, r.failed, r.esi_calls, r.attempt, r.worker, r.error
        FROM sync_runs r LEFT JOIN users u USING (character_id)
        ORDER BY r.id DESC LIMIT %s
        """,
        (limit,),
    ).fetchall()


def failed_refs(conn: Connection, *, limit: int) -> list[dict]:
    """References whose detail fetch failed and that are still not stored, latest failure first; each row
    also carries `total`, the number of such references (from the counters schema.sql's triggers keep). The list
    walks the index of failed references (killmail_refs_failed) only until it has found them; none when the
    counters say there are none."""
    total = one_row(conn.execute(
        f"SELECT coalesce(sum(n), 0)::bigint AS total FROM row_counts "
        f"WHERE starts_with(counter, 'unstored_refs:') AND {_ATTEMPTS_SQL} > 0"))["total"]
    if not total:
        return []
    return conn.execute(
        """
        SELECT r.killmail_id, r.attempts, r.last_error, r.next_attempt_at, r.first_seen_at, %(total)s::bigint AS total
        FROM killmail_refs r
        WHERE r.attempts > 0 AND NOT EXISTS (SELECT 1 FROM killmails k WHERE k.killmail_id = r.killmail_id)
        ORDER BY r.next_attempt_at DESC NULLS LAST, r.killmail_id DESC LIMIT %(limit)s
        """,
        {"total": total, "limit": min(limit, total)},
    ).fetchall()


# The shared buckets by esi_limits_shared and the per-character ones paused now by esi_limits_paused, folded.
_ESI_LIMIT_BUCKETS_SQL = f"""
    SELECT CASE WHEN {_OWNER_GROUP_SQL} = ANY(%(owner_groups)s) THEN {_OWNER_GROUP_SQL}
                ELSE bucket END AS bucket, count(*) AS buckets, min(remaining) AS remaining,
           max(limit_tokens) AS limit_tokens, max(window_seconds) AS window_seconds,
           max(paused_until) FILTER (WHERE paused_until > %(now)s) AS paused_until,
           count(*) FILTER (WHERE paused_until > %(now)s) AS paused, max(updated_at) AS updated_at
    FROM (SELECT * FROM esi_limits WHERE {_SHARED_BUCKET_SQL}
          UNION ALL
          SELECT * FROM esi_limits WHERE paused_until > %(now)s AND NOT {_SHARED_BUCKET_SQL}) l
    GROUP BY 1 ORDER BY 1
"""


def esi_limit_buckets(conn: Connection, now: datetime) -> list[dict]:
    """ESI limit state by bucket: the buckets every caller shares, and the per-character buckets
    ('<group>:<character id>') paused now, folded into their group's row (the one that keeps the group's limit):
    the lowest remaining count, the latest pause, how many of them are paused, and `buckets`, the rows folded.

    The limiter writes a per-character bucket only to pause it, and keeps the row: the rows of pilots not paused
    now (up to one per pilot) are not read. They would only add to `buckets` and `updated_at`, at the cost of a
    pass over them."""
    return conn.execute(_ESI_LIMIT_BUCKETS_SQL, {"now": now, "owner_groups": list(OWNER_BUCKET_GROUPS)}).fetchall()


def esi_call_counts(conn: Connection) -> list[dict]:
    """ESI calls so far by route group and status."""
    return conn.execute("SELECT route_group, status, calls FROM esi_calls ORDER BY route_group, status").fetchall()


# ---------------------------------------------------------------------------------------------- web app API


def user_exists(conn: Connection, character_id: int) -> bool:
    """Whether a user with this character id exists."""
    return conn.execute("SELECT 1 FROM users WHERE character_id = %s", (character_id,)).fetchone() is not None


def killmails_page(conn: Connection, kind: str, owner_id: int, *, limit: int, before: int | None) -> list[dict]:
    """A pilot's (kind 'character') or corporation's kills and losses, newest first (by killmail id, for keyset
    paging), with their ISK values, a victim summary and an attacker summary (how many, and who dealt the final
    blow)."""
    table, column = _LINKS[kind]
    return conn.execute(
        sql.SQL("""
        SELECT k.killmail_id, k.killmail_hash, k.killmail_time, k.solar_system_id,
               k.victim_character_id, k.victim_corporation_id, k.victim_alliance_id, k.victim_ship_type_id,
               k.victim_damage_taken, (k.{victim} = %(id)s) AS is_loss,
               k.destroyed_value, k.dropped_value, k.total_value,
               (SELECT count(*) FROM attackers a WHERE a.killmail_id = k.killmail_id) AS attacker_count,
               fb.character_id AS final_blow_character_id, fb.corporation_id AS final_blow_corporation_id,
               fb.ship_type_id AS final_blow_ship_type_id
        FROM {table} c
        JOIN killmails k USING (killmail_id)
        LEFT JOIN LATERAL (SELECT * FROM attackers a WHERE a.killmail_id = k.killmail_id AND a.final_blow
                           ORDER BY a.attacker_index LIMIT 1) fb ON true
        WHERE c.{column} = %(id)s AND (%(before)s::bigint IS NULL OR c.killmail_id < %(before)s)
        ORDER BY c.killmail_id DESC
        LIMIT %(limit)s
        """).format(table=sql.Identifier(table), column=sql.Identifier(column),
                    victim=sql.Identifier(f"victim_{column}")),
        {"id": owner_id, "before": before, "limit": limit},
    ).fetchall()


def pilot_sync_state(conn: Connection, character_id: int, now: datetime, *, interval: int) -> dict | None:
    """What a pilot's own page says of its syncs: the user's sync columns, `revoked`, `next_due_at` (by the
    producer's rule; null for a user never synced) and its latest run's status and error."""
    return conn.execute(
        f"""
        SELECT u.character_id, u.character_name, u.corporation_id, u.scopes, u.queued_at, u.last_sync_at,
               u.last_sync_status, u.token_error, u.sync_requested_at, NOT {_LIVE_GRANT_SQL} AS revoked,
               u.last_sync_at + {_INTERVAL_SQL} AS next_due_at,
               r.status AS run_status, r.error AS run_error, r.finished_at AS run_finished_at
        FROM users u
        LEFT JOIN LATERAL (SELECT status, error, finished_at FROM sync_runs s
                           WHERE s.character_id = u.character_id AND s.kind = 'character'
                           ORDER BY s.started_at DESC LIMIT 1) r ON true
        WHERE u.character_id = %(id)s
        """,
        {"id": character_id, "now": now, "interval": interval},
    ).fetchone()


def request_sync(conn: Connection, character_id: int, now: datetime, *, min_gap: int) -> bool:
    """Note a pilot's "Sync now" unless it pressed it less than min_gap seconds ago (in any process); True when
    this request may go on."""
    return conn.execute(
        """
        UPDATE users SET sync_requested_at = %(now)s
        WHERE character_id = %(id)s
          AND (sync_requested_at IS NULL OR sync_requested_at <= %(now)s - make_interval(secs => %(gap)s))
        """,
        {"id": character_id, "now": now, "gap": min_gap},
    ).rowcount == 1
