"""Loaded into the worker's processes by the scale scenario (bench/scale.py puts this folder on PYTHONPATH) when
BENCH_TRACE_DIR is set: every psycopg connection writes libpq's protocol trace to a file of its own, from which the
bench counts round trips (a turn from the client's messages to the server's). Never part of production."""
import itertools
import os

_DIR = os.environ.get("BENCH_TRACE_DIR")
if _DIR:
    import psycopg
    from psycopg import pq

    _connect = psycopg.Connection.connect.__func__
    _serial = itertools.count()
    _files = []  # open for the processes' life: libpq writes to them until the connection closes

    def _traced_connect(cls, *args, **kwargs):
        conn = _connect(cls, *args, **kwargs)
        trace = open(os.path.join(_DIR, f"{os.getpid()}-{next(_serial)}.trace"), "w")
        _files.append(trace)
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        return conn

    psycopg.Connection.connect = classmethod(_traced_connect)
    psycopg.connect = psycopg.Connection.connect
