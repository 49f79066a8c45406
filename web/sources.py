"""Where the web app reads: the database through a small pool per process (a /status request may take a second
connection, to read beside its first), the broker through one kept connection per process (the queue figures,
read at most every few seconds) and short-lived probes with short timeouts (/health). Each is made at first use
in the process that uses it, so gunicorn's master holds none.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, cast

import pika
import pika.exceptions
import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

import broker
from settings import Settings, describe, load_settings

log = logging.getLogger(__name__)

POOL_WAIT_SECONDS = 1.0       # a request waits this long for a pooled connection, then reports the database down
# A request's second connection, for a read beside its first, is taken only when one is free (or nearly) at once:
# waiting for one would cost more than the read it saves.
SPARE_WAIT_SECONDS = 0.005
# A connection for each of gunicorn's threads (gunicorn.conf.py), and one more for one request at a time to read
# beside its own (spare_connection): a request never waits for a connection another request's second one holds.
POOL_SIZE = 4 + 1
CONNECT_TIMEOUT_SECONDS = 2   # libpq connect_timeout, for a host that drops packets rather than refusing
# A pool retries a lost database in the background with growing delays; giving up after a few seconds lets the
# next request start a fresh attempt at once, so a restarted database is seen again within seconds, not minutes.
POOL_RECONNECT_SECONDS = 5.0
STATEMENT_TIMEOUT_MS = 5000   # no status query may hold a connection longer
# The day's runs are sorted by hour and their durations for the percentiles (db.run_figures), about 100 bytes a
# run: this keeps 200 000 runs a day in memory, where PostgreSQL's default (4 MB) writes them to temporary files.
WORK_MEM = "32MB"
BROKER_TIMEOUT_SECONDS = 1.0  # TCP connect and AMQP handshake, each
BROKER_CACHE_SECONDS = 1.0    # a probe every few ms must not open a broker connection each time
QUEUE_CACHE_SECONDS = 5.0     # /status and /metrics read the queue figures at most this often per process
# Nothing services the kept broker connection's heartbeats between two reads, and the broker drops a connection
# silent for two heartbeat intervals (60 s): one idle for longer than this is closed and a new one opened.
BROKER_KEEP_SECONDS = 20.0
BROKER_ERRORS = (pika.exceptions.AMQPError, OSError)


class Sources:
    """Where the numbers come from, each made at first use in this process: settings, pool, broker probe, queue
    figures. `clock` (seconds, monotonic) times what is kept for a while."""

    def __init__(self, settings: Settings | None = None, *, clock: Callable[[], float] = time.monotonic):
        self._settings = settings
        self._clock = clock
        self._pool: ConnectionPool[psycopg.Connection[DictRow]] | None = None
        self._pool_pid = 0
        self._pool_lock = threading.Lock()
        self._spare_lock = threading.Lock()  # held by the one request that has the pool's spare connection
        self._broker_lock = threading.Lock()
        self._broker_checked = -math.inf
        self._broker_error: str | None = None
        self._queue_lock = threading.Lock()  # also keeps the kept connection to one thread: pika's is not shared
        self._queue: dict[str, Any] = {}
        self._queue_read = -math.inf
        self._kept: pika.BlockingConnection | None = None
        self._kept_pid = 0
        self._kept_used = -math.inf

    @property
    def settings(self) -> Settings:
        """The settings given, or read from the environment at first use (ConfigError names a bad variable)."""
        if self._settings is None:
            self._settings = load_settings(need_esi=False)
        return self._settings

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[DictRow]]:
        """A pooled autocommit connection with dict rows; psycopg_pool.PoolTimeout when none comes in time."""
        with self._get_pool().connection(timeout=POOL_WAIT_SECONDS) as conn:
            yield conn

    @contextmanager
    def spare_connection(self) -> Iterator[psycopg.Connection[DictRow] | None]:
        """A second pooled connection as connection() gives, for one request at a time, when one is free within
        SPARE_WAIT_SECONDS; else None (and the pool, below its size, opens one for a later request)."""
        if not self._spare_lock.acquire(blocking=False):
            yield None
            return
        try:
            with ExitStack() as stack:
                try:
                    conn = stack.enter_context(self._get_pool().connection(timeout=SPARE_WAIT_SECONDS))
                except PoolTimeout:
                    conn = None
                yield conn
        finally:
            self._spare_lock.release()

    def _get_pool(self) -> ConnectionPool[psycopg.Connection[DictRow]]:
        with self._pool_lock:
            # A pool belongs to the process that opened it: after a fork, the child opens its own.
            if self._pool is None or self._pool_pid != os.getpid():
                # Its connections' rows are dicts (kwargs' row_factory), which the pool's type cannot tell: only
                # a connection_class would, and one given replaces the pool's own (psycopg_pool's PoolConnection).
                self._pool = cast("ConnectionPool[psycopg.Connection[DictRow]]", ConnectionPool(
                    self.settings.database_url, min_size=1, max_size=POOL_SIZE, open=False, name="status",
                    timeout=POOL_WAIT_SECONDS, reconnect_timeout=POOL_RECONNECT_SECONDS,
                    check=ConnectionPool.check_connection,
                    kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c work_mem={WORK_MEM}"},
                ))
                self._pool.open(wait=False)
                self._pool_pid = os.getpid()
            return self._pool

    def broker_error(self) -> str | None:
        """Why the broker refused a connection, or None when it accepted one (an answer kept for a second)."""
        with self._broker_lock:
            if self._clock() - self._broker_checked >= BROKER_CACHE_SECONDS:
                try:
                    open_broker(self.settings.rabbitmq_url).close()
                    self._broker_error = None
                except BROKER_ERRORS as exc:
                    self._broker_error = describe(exc)
                    log.warning("health: broker unreachable: %s", self._broker_error)
                self._broker_checked = self._clock()
            return self._broker_error

    def queue_state(self) -> dict[str, Any]:
        """Jobs waiting in the queue, its consumers, jobs in its retry queues and in its dead-letter queue; the
        numbers are None, with an error, when the broker cannot be reached. Read at most every
        QUEUE_CACHE_SECONDS, through a connection kept for the next read."""
        with self._queue_lock:
            if self._clock() - self._queue_read >= QUEUE_CACHE_SECONDS:
                self._queue = self._read_queue()
                self._queue_read = self._clock()
            return dict(self._queue)

    def _read_queue(self) -> dict[str, Any]:
        settings = self.settings
        state: dict[str, Any] = {"name": settings.queue_name, "depth": None, "consumers": None, "retrying": None,
                                 "dead": None, "error": None}
        try:
            state.update(self._depths())
        except BROKER_ERRORS as exc:
            self._drop_connection()
            state["error"] = f"broker unreachable: {describe(exc)}"
        return state

    def _depths(self) -> dict[str, int]:
        connection, reused = self._connection()
        settings = self.settings
        try:
            depths = broker.queue_depths(connection, settings.queue_name, max_attempts=settings.max_attempts)
        except BROKER_ERRORS:
            if not reused:
                raise
            self._drop_connection()  # it died since its last use (a broker restart): once more on a new one
            connection, _ = self._connection()
            depths = broker.queue_depths(connection, settings.queue_name, max_attempts=settings.max_attempts)
        self._kept_used = self._clock()
        return depths

    def _connection(self) -> tuple[pika.BlockingConnection, bool]:
        """The kept broker connection, or a new one in place of a closed, idle or inherited one; and whether it
        was kept."""
        kept = self._kept
        if kept is not None and (self._kept_pid != os.getpid() or not kept.is_open
                                 or self._clock() - self._kept_used > BROKER_KEEP_SECONDS):
            self._drop_connection()
        if self._kept is not None:
            return self._kept, True
        self._kept, self._kept_pid = open_broker(self.settings.rabbitmq_url), os.getpid()
        return self._kept, False

    def _drop_connection(self) -> None:
        kept, self._kept = self._kept, None
        if kept is not None and self._kept_pid == os.getpid() and kept.is_open:
            try:
                kept.close()
            except BROKER_ERRORS:
                pass

    def close(self) -> None:
        """Close this process's pool and broker connection (tests; a worker process simply exits)."""
        with self._pool_lock:
            if self._pool is not None and self._pool_pid == os.getpid():
                self._pool.close()
            self._pool = None
        with self._queue_lock:
            self._drop_connection()


def open_broker(url: str) -> pika.BlockingConnection:
    """A broker connection that gives up within about two seconds."""
    return broker.connect(url, timeout=BROKER_TIMEOUT_SECONDS)
