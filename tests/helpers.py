"""Helpers the tests share that are no fixtures."""
from __future__ import annotations

from datetime import datetime, timedelta


def ledger_spent(conn, bucket: str, now: datetime, *, window: int) -> dict:
    """What the ESI ledger counts against a bucket now: own and other tokens spent in the window, and in flight."""
    return conn.execute(
        """
        SELECT (SELECT coalesce(sum(own), 0) FROM esi_spent
                WHERE bucket = %(b)s AND second > %(since)s)::int AS own,
               (SELECT coalesce(sum(other), 0) FROM esi_spent
                WHERE bucket = %(b)s AND second > %(since)s)::int AS other,
               (SELECT coalesce(sum(tokens), 0) FROM esi_in_flight
                WHERE bucket = %(b)s AND sent_at > %(since)s)::int AS in_flight
        """,
        {"b": bucket, "since": now - timedelta(seconds=window)},
    ).fetchone()
