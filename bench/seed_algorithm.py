"""The seed's own sync algorithm, kept plain: the peer that bench/run.py measures the worker against.

Five users at a time (a thread pool of five, one user per thread). For each user: one list call (page 1 only;
the seed read the first page and never looked at X-Pages), then for each listed killmail in turn: ask the
database whether it is stored (SELECT 1 FROM killmails WHERE killmail_id = %s), fetch the detail, insert the
killmail and each attacker and item row by row (row_by_row.py) and commit. No token refresh (it is
given valid tokens), no ETag, no Expires, no shared limits, no claims: two threads may fetch the same killmail.
Each thread has its own database connection and its own requests.Session (keep-alive, as the seed's was).

    DATABASE_URL=... ESI_BASE_URL=... ESI_USER_AGENT=... python bench/seed_algorithm.py

prints one JSON line: users, listed, fetched, saved, skipped, failed, esi_calls, started/finished (epoch seconds).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import db  # noqa: E402
from killmail_model import parse_killmail  # noqa: E402
from row_by_row import save_killmail_row_by_row  # noqa: E402
from settings import ConfigError, Settings, load_settings  # noqa: E402

log = logging.getLogger(__name__)

USERS_AT_A_TIME = 5


@dataclass
class Tally:
    """What one user's sync (or the whole run) did."""

    users: int = 0
    listed: int = 0
    fetched: int = 0
    saved: int = 0
    skipped: int = 0
    failed: int = 0
    esi_calls: int = 0

    def add(self, other: Tally) -> None:
        """Sum another tally into this one."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


def sync_user(settings: Settings, user: dict) -> Tally:
    """List one user's killmails (page 1), then fetch and store each one not yet in the database."""
    tally = Tally(users=1)
    headers = {"User-Agent": settings.esi_user_agent, "X-Compatibility-Date": settings.esi_compatibility_date}
    base = settings.esi_base_url
    with db.connect(settings.database_url) as conn, requests.Session() as http:
        http.headers.update(headers)
        response = http.get(f"{base}/characters/{user['character_id']}/killmails/recent/",
                            headers={"Authorization": f"Bearer {user['access_token']}"},
                            timeout=settings.http_timeout_seconds)
        tally.esi_calls += 1
        if response.status_code != 200:
            log.warning("list of %s: HTTP %s", user["character_id"], response.status_code)
            tally.failed += 1
            return tally
        for ref in response.json():
            tally.listed += 1
            killmail_id, killmail_hash = ref["killmail_id"], ref["killmail_hash"]
            if conn.execute("SELECT 1 FROM killmails WHERE killmail_id = %s", (killmail_id,)).fetchone():
                conn.commit()
                tally.skipped += 1
                continue
            detail = http.get(f"{base}/killmails/{killmail_id}/{killmail_hash}/",
                              timeout=settings.http_timeout_seconds)
            tally.esi_calls += 1
            if detail.status_code != 200:
                conn.commit()
                tally.failed += 1
                continue
            tally.fetched += 1
            killmail = parse_killmail(detail.json(), killmail_id=killmail_id, killmail_hash=killmail_hash)
            tally.saved += save_killmail_row_by_row(conn, killmail)
            conn.commit()
    return tally


def run(settings: Settings) -> dict:
    """Sync every user with a token, five at a time; returns the summed tally with start and finish times."""
    started = time.time()
    with db.connect(settings.database_url) as conn:
        users = conn.execute("SELECT character_id, access_token FROM users WHERE access_token IS NOT NULL "
                             "ORDER BY character_id").fetchall()
    total = Tally()
    with ThreadPoolExecutor(max_workers=USERS_AT_A_TIME) as pool:
        for tally in pool.map(lambda user: sync_user(settings, user), users):
            total.add(tally)
    return {**asdict(total), "started": started, "finished": time.time()}


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(run(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
