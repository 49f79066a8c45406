"""How fast /health answers under gunicorn: the median of sequential probes with the database and the broker up
(target under 50 ms), and the time to a 503 with the database's port closed (target under 2 s), then with the
broker's port closed. Each probe opens a new connection, as a load balancer's does. Prints the figures; exits 1
when a target is missed.

    .venv/bin/python bench/health_bench.py [--requests 200] [--database-url URL] [--rabbitmq-url URL]
"""
from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "devtools")]  # the project's modules, and the screenshot tool's runner

from screenshot import ADMIN_URL, RABBITMQ_URL, free_port, serve, status_env  # noqa: E402

UP_TARGET_MS = 50.0
DOWN_TARGET_S = 2.0
WARM_UP = 10      # probes before measuring, so that every worker has opened its pool
DOWN_PROBES = 5


def probe(base: str) -> tuple[int, float]:
    """One GET /health on a fresh connection: (status, seconds)."""
    parts = urlsplit(base)
    started = time.perf_counter()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    return response.status, time.perf_counter() - started


def healthy_figures(database_url: str, rabbitmq_url: str, requests: int) -> tuple[list[float], set[int]]:
    """Seconds taken by each of `requests` sequential probes, and the statuses seen."""
    with serve(status_env(database_url, queue="health_bench", rabbitmq_url=rabbitmq_url)) as base:
        for _ in range(WARM_UP):
            probe(base)
        results = [probe(base) for _ in range(requests)]
    return [seconds for _, seconds in results], {status for status, _ in results}


def outage_figures(database_url: str, rabbitmq_url: str) -> tuple[list[float], set[int]]:
    """Seconds taken by each probe (the first one cold) while one service's port is closed."""
    with serve(status_env(database_url, queue="health_bench", rabbitmq_url=rabbitmq_url)) as base:
        results = [probe(base) for _ in range(DOWN_PROBES)]
    return [seconds for _, seconds in results], {status for status, _ in results}


def closed(url: str) -> str:
    """The same URL with its port replaced by one nothing listens on."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return parts._replace(netloc=f"{user + '@' if user else ''}127.0.0.1:{free_port()}").geturl()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="sequential probes with both services up")
    parser.add_argument("--database-url", default=ADMIN_URL, help="a database that answers (only SELECT 1 runs)")
    parser.add_argument("--rabbitmq-url", default=RABBITMQ_URL, help="a broker that answers")
    args = parser.parse_args(argv)
    ok = True

    times, statuses = healthy_figures(args.database_url, args.rabbitmq_url, args.requests)
    median_ms = statistics.median(times) * 1000
    p95_ms = statistics.quantiles(times, n=20)[-1] * 1000
    met = statuses == {200} and median_ms < UP_TARGET_MS
    ok &= met
    print(f"/health, database and broker up: {len(times)} sequential requests, statuses {sorted(statuses)}, "
          f"median {median_ms:.1f} ms, p95 {p95_ms:.1f} ms, max {max(times) * 1000:.1f} ms "
          f"(target: median < {UP_TARGET_MS:.0f} ms) {'OK' if met else 'MISSED'}")

    for what, database_url, rabbitmq_url in (
            ("database port closed", closed(args.database_url), args.rabbitmq_url),
            ("broker port closed", args.database_url, closed(args.rabbitmq_url))):
        times, statuses = outage_figures(database_url, rabbitmq_url)
        met = statuses == {503} and max(times) < DOWN_TARGET_S
        ok &= met
        print(f"/health, {what}: statuses {sorted(statuses)}, first (cold) {times[0]:.2f} s, "
              f"worst of {len(times)} {max(times):.2f} s (target: < {DOWN_TARGET_S:.0f} s) {'OK' if met else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
