"""Configure where new killmails are announced: `add` a webhook (Discord or plain JSON) with its filters, `list`
them with their outbox counts, `test` one with a sample post."""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

import requests

import db
import notifications
import settings
from killmail_model import parse_killmail
from settings import ConfigError

SAMPLE = Path(__file__).resolve().parent / "tests" / "data" / "killmail_134265477.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add a webhook (or replace the one of that name)")
    add.add_argument("name")
    add.add_argument("url", nargs="?", help="https (http only to this machine); best left out, as it shows in ps "
                                            "and the shell's history: then WEBHOOK_URL, else a line on stdin")
    add.add_argument("--format", choices=("discord", "json"), default="discord")
    add.add_argument("--character", type=int, action="append", default=[], metavar="ID",
                     help="announce this character's kills and losses (repeat for more)")
    add.add_argument("--corporation", type=int, action="append", default=[], metavar="ID",
                     help="announce this corporation's kills and losses (repeat for more)")
    add.add_argument("--kills", action=argparse.BooleanOptionalAction, default=True)
    add.add_argument("--losses", action=argparse.BooleanOptionalAction, default=True)
    add.add_argument("--min-value", type=float, metavar="ISK", help="only killmails worth at least this")
    commands.add_parser("list", help="list the webhooks and their outbox counts")
    test = commands.add_parser("test", help="post a sample killmail (the latest stored one, if any) now")
    test.add_argument("name")
    return parser.parse_args(argv)


def sample_killmail(conn) -> dict | None:
    """The latest stored killmail, or the one in tests/data when none is stored (None where tests/ is absent)."""
    stored = db.notification_killmail(conn)
    if stored is not None:
        return stored
    if not SAMPLE.exists():  # the production image ships no tests/
        return None
    body = json.loads(SAMPLE.read_text())
    killmail = parse_killmail(body, killmail_id=body["killmail_id"], killmail_hash="0" * 40)
    row = dict(zip(db.KILLMAIL_COLUMN_NAMES, killmail.row, strict=False))
    return {**row, "total_value": None, "attackers": len(killmail.attackers)}


def webhook_url(given: str | None) -> str:
    """The URL to add: as given, else WEBHOOK_URL, else a line on stdin (asked for without echo on a terminal);
    ConfigError unless it is https, or http to this machine."""
    if given:
        print("⚠️ a webhook URL holds its secret, and on the command line it shows in ps and the shell's history: "
              "set WEBHOOK_URL or pipe it in instead", file=sys.stderr)
    url = (given or os.environ.get("WEBHOOK_URL") or
           (getpass.getpass("webhook URL: ") if sys.stdin.isatty() else sys.stdin.readline())).strip()
    return settings.destination_url("the webhook URL", url)


def list_webhooks(conn) -> int:
    for w in db.list_webhooks(conn):
        state = "refused: " + w["refused"] if w["refused"] else "enabled" if w["enabled"] else "disabled"
        who = ",".join(map(str, w["character_ids"] + w["corporation_ids"])) or "everyone"
        print(f"{w['name']}\t{w['format']}\t{state}\t{who}\tkills={w['kills']} losses={w['losses']} "
              f"min={w['min_value'] or '-'}\tpending={w['pending']} delivered={w['delivered']} "
              f"failed={w['failed']}")
    return 0


def test_webhook(conn, name: str, user_agent: str) -> int:
    webhook = db.get_webhook(conn, name)
    if webhook is None:
        print(f"no webhook named {name!r}", file=sys.stderr)
        return 1
    killmail = sample_killmail(conn)
    if killmail is None:
        print("no killmail stored yet to post as a sample", file=sys.stderr)
        return 1
    options = notifications.SenderOptions(user_agent=user_agent)
    with requests.Session() as session:
        response, error = notifications.post(session, webhook["format"], webhook["url"], killmail, options)
    if response is None or not response.ok:
        print(f"❌ {name}: {error or f'HTTP {response.status_code}'}", file=sys.stderr)
        return 1
    print(f"✅ {name}: HTTP {response.status_code}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand; the exit status."""
    args = parse_args(argv)
    try:
        settings, conn = notifications.open_database(need_user_agent=False)
    except notifications.CannotStart as exc:
        print(exc, file=sys.stderr)
        return exc.code
    with conn:
        if args.command == "add":
            try:
                url = webhook_url(args.url)
            except ConfigError as exc:
                print(f"❌ {exc}", file=sys.stderr)
                return 2
            db.add_webhook(conn, args.name, url, format=args.format, character_ids=args.character,
                           corporation_ids=args.corporation, kills=args.kills, losses=args.losses,
                           min_value=args.min_value)
            conn.commit()
            print(f"✅ added {args.name}")
            return 0
        if args.command == "list":
            return list_webhooks(conn)
        return test_webhook(conn, args.name, settings.esi_user_agent or "killmail-worker webhooks test")


if __name__ == "__main__":
    sys.exit(main())
