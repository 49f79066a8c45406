"""Names for what people read: the ids of saved killmails (pilots, corporations, alliances, ship types, systems)
named through ESI's batched names call, and each system's region looked up once. A process's Namer does it off the
jobs' path; resolve_names does it in place (a job without a Namer, `webhooks.py test`)."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import db
from esi import ErrorLimited, EsiClient, EsiError, NotFound, Paused, RateLimited
from settings import describe

log = logging.getLogger(__name__)

UNKNOWN_NAME_RETRY = timedelta(days=1)  # an id ESI could not name is not asked again for this long
NAME_EVERY = 10.0                       # seconds between a process's rounds of names calls
CLOSE_LOCATE = 1.0                      # seconds a stopping process spends on systems' regions at the most


class Namer:
    """Names the ids of a process's newly saved killmails on a thread of its own, every NAME_EVERY seconds, in
    ESI's batches of 1 000: a names call in every job would add an ESI round trip to each job's time, and names
    are for people to read, who can wait seconds for them. Jobs hand their ids over and go on; close() names
    what is still pending."""

    def __init__(self, connect: Callable[[], Any], esi: EsiClient, *, every: float = NAME_EVERY):
        self._connect, self._esi, self._every = connect, esi, every
        self._conn: db.Connection | None = None
        self._pending: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._locate_until = float("inf")  # close() bounds the region lookups of the rounds left
        self._thread = threading.Thread(target=self._run, name="namer", daemon=True)
        self._thread.start()

    def add(self, ids: set[int]) -> None:
        with self._lock:
            self._pending |= ids

    def close(self, timeout: float = 30.0) -> None:
        """Name what is pending, within `timeout`: systems' regions (two calls a system) are looked up for
        CLOSE_LOCATE seconds (or half the timeout) at the most, leaving the rest to the names call; systems not
        reached get their region from a later killmail that shows them."""
        self._locate_until = time.monotonic() + min(CLOSE_LOCATE, timeout / 2)
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self._every)
            self._wake.clear()
            self._name_pending()
        self._name_pending()
        if self._conn is not None:
            self._conn.close()

    def _name_pending(self) -> None:
        with self._lock:
            ids, self._pending = self._pending, set()
        if not ids:
            return
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            resolve_names(self._conn, self._esi, ids, datetime.now(UTC),
                          locate_while=lambda: time.monotonic() < self._locate_until)
        except Exception as exc:  # names are no job's: a failure costs only these names
            log.warning("  names not resolved: %s", describe(exc))
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def resolve_names(conn: db.Connection, esi: EsiClient, ids: set[int], now: datetime, *,
                  locate_while: Callable[[], bool] = lambda: True) -> None:
    """Name the ids not named yet, and the regions of the systems among them (see locate_systems), in one batched
    call (or a few, see EsiClient.resolve_names). A failure costs only the names: the next job that shows these
    ids asks again."""
    wanted = db.names_to_resolve(conn, ids | locate_systems(conn, esi, ids, now, locate_while=locate_while), now)
    conn.commit()
    if not wanted:
        return
    try:
        names, unknown = esi.resolve_names(wanted)
    except EsiError as exc:
        log.warning("  names not resolved: %s", exc)
        return
    db.save_names(conn, names, unknown, now, unknown_for=UNKNOWN_NAME_RETRY)
    conn.commit()


def locate_systems(conn: db.Connection, esi: EsiClient, ids: set[int], now: datetime, *,
                   locate_while: Callable[[], bool] = lambda: True) -> set[int]:
    """The regions of the systems among these ids. A system is looked up once (its system, then its
    constellation) and its region kept: systems never move. A failure leaves the system without a region until
    a later killmail shows it again (its posts go without one after the names wait); a 404 is kept as no
    region, since asking again costs the error limit every time. The lookups end early once locate_while()
    is false (a stopping namer's deadline)."""
    systems = db.systems_to_locate(conn, ids)
    # No transaction stays open across an ESI call: another process saving the same system's region would wait
    # on it (an INSERT waits for the uncommitted row of the same key), for as long as this call waits for ESI.
    conn.commit()
    for system_id in systems:
        if not locate_while():
            log.info("  regions of the other systems left to later killmails: the process is stopping")
            break
        try:
            region_id = esi.get_region_of(esi.get_constellation_of(system_id))
        except NotFound as exc:
            log.warning("  system %s has no region: %s", system_id, exc)
            region_id = None
        except (Paused, ErrorLimited, RateLimited) as exc:  # every further call would wait or fail the same
            log.warning("  regions not found: %s", exc)
            break
        except EsiError as exc:
            log.warning("  region of system %s not found: %s", system_id, exc)
            continue
        db.save_system_region(conn, system_id, region_id, now)
        conn.commit()
    regions = set(db.regions_of(conn, ids).values())
    conn.commit()
    return regions
