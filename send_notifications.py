"""Deliver the notification outbox: post new killmails to the configured webhooks and, with ZKILLBOARD_PUSH=1,
to zKillboard. Runs until stopped (SIGTERM/SIGINT: finish the post in hand, exit 0; a second signal: now).
Several may run at once: each locks the rows it posts (FOR UPDATE SKIP LOCKED)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

import db
import notifications
from settings import setup_logging

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="log with time, level and pid")
    return parser.parse_args(argv)


class Signals:
    """The handler only counts: the main thread sees the count and stops the sender."""

    def __init__(self) -> None:
        self.count = 0

    def on_signal(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1:
            os._exit(1)  # a second signal means now; the row in hand stays in the outbox


def main(argv: list[str] | None = None) -> int:
    """Read the settings, connect, and deliver until stopped; the exit status."""
    args = parse_args(argv)
    setup_logging(verbose=args.verbose)
    try:
        settings, conn = notifications.open_database(need_user_agent=True)
    except notifications.CannotStart as exc:
        print(exc, file=sys.stderr)
        return exc.code
    signals = Signals()
    signal.signal(signal.SIGTERM, signals.on_signal)
    signal.signal(signal.SIGINT, signals.on_signal)
    options = notifications.SenderOptions(user_agent=settings.esi_user_agent,
                                          timeout=settings.http_timeout_seconds)
    with conn:
        notifications.register_zkillboard(conn, settings.zkillboard_url, enabled=settings.zkillboard_push)
    stop = threading.Event()
    sender = threading.Thread(target=notifications.serve, name="sender", daemon=True,
                              args=(lambda: db.connect(settings.database_url), options, stop))
    sender.start()
    log.info("📣 Sending notifications (zKillboard %s)", "on" if settings.zkillboard_push else "off")
    while sender.is_alive():
        sender.join(0.2)
        if signals.count:
            stop.set()
    log.info("👋 Stopped")
    return 0 if signals.count else 1


if __name__ == "__main__":
    sys.exit(main())
