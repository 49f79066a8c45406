"""Configure where new killmails are announced: `add` a webhook (Discord or plain JSON) with its filters, `list`
them with their outbox counts, `test` one with a sample post (its ids named through ESI first, as the workers
name them)."""
from __future__ import annotations

import argparse
import getpass
import os
import sys
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import requests

import db
import names
import notifications
from esi import EsiClient
from killmail_model import Killmail, parse_killmail
from limits import SharedLimits
from settings import ConfigError, Settings, destination_url

# What `test` posts when no killmail is stored yet: a real one from ESI (134265477), without its items, which no
# post shows. It ships with the code, so a fresh production install can test a webhook too.
SAMPLE: dict[str, Any] = {
    "killmail_id": 134265477, "killmail_time": "2026-03-25T14:26:36Z", "solar_system_id": 30000743,
    "victim": {"alliance_id": 1354830081, "character_id": 2121652582, "corporation_id": 98366055,
               "damage_taken": 14136, "ship_type_id": 17478,
               "position": {"x": -84679075260.99292, "y": -37815568744.85742, "z": 84616162342.0539}},
    "attackers": [{"alliance_id": 99013537, "character_id": 96424385, "corporation_id": 98601573,
                   "damage_done": 14136, "final_blow": True, "security_status": 5, "ship_type_id": 35683,
                   "weapon_type_id": 3178}],
}


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


def sample_killmail(conn: db.Connection) -> dict:
    """The latest stored killmail, or SAMPLE when none is stored."""
    stored = db.notification_killmail(conn)
    if stored is not None:
        return stored
    return post_columns(parse_killmail(SAMPLE, killmail_id=SAMPLE["killmail_id"], killmail_hash="0" * 40))


def post_columns(killmail: Killmail, *, total_value: Decimal | None = None) -> dict:
    """A parsed killmail as the columns of db.notification_killmail."""
    attackers = killmail.attackers
    final = next((a for a in attackers if a.final_blow), None)
    return {**killmail.row._asdict(), "total_value": total_value, "attackers": len(attackers),
            "final_blow_character_id": None if final is None else final.character_id,
            "final_blow_corporation_id": None if final is None else final.corporation_id,
            "final_blow_ship_type_id": None if final is None else final.ship_type_id,
            "attacker_character_ids": sorted({a.character_id for a in attackers if a.character_id is not None}),
            "attacker_corporation_ids": sorted({a.corporation_id for a in attackers if a.corporation_id is not None})}


def name_ids(conn: db.Connection, settings: Settings, killmail: dict) -> None:
    """Name the ids the post shows through ESI (the shared limits, the names table), as the workers do."""
    if not settings.esi_user_agent:
        print("ESI_USER_AGENT is not set: ids not named yet show as their kind and id", file=sys.stderr)
        return
    limits = SharedLimits(lambda: db.connect(settings.database_url, autocommit=True), egress=settings.esi_egress)
    try:
        ids = {killmail[column] for column in db.NAMED_COLUMNS} - {None}
        names.resolve_names(conn, EsiClient(settings, limits=limits), ids, datetime.now(UTC))
    finally:
        limits.close()


def webhook_url(given: str | None) -> str:
    """The URL to add: as given, else WEBHOOK_URL, else a line on stdin (asked for without echo on a terminal);
    ConfigError unless it is https, or http to this machine."""
    if given:
        print("⚠️ a webhook URL holds its secret, and on the command line it shows in ps and the shell's history: "
              "set WEBHOOK_URL or pipe it in instead", file=sys.stderr)
    url = (given or os.environ.get("WEBHOOK_URL") or
           (getpass.getpass("webhook URL: ") if sys.stdin.isatty() else sys.stdin.readline())).strip()
    return destination_url("the webhook URL", url)


def list_webhooks(conn: db.Connection) -> int:
    for w in db.list_webhooks(conn):
        state = "refused: " + w["refused"] if w["refused"] else "enabled" if w["enabled"] else "disabled"
        who = ",".join(map(str, w["character_ids"] + w["corporation_ids"])) or "everyone"
        print(f"{w['name']}\t{w['format']}\t{state}\t{who}\tkills={w['kills']} losses={w['losses']} "
              f"min={w['min_value'] or '-'}\tpending={w['pending']} delivered={w['delivered']} "
              f"failed={w['failed']}")
    return 0


def test_webhook(conn: db.Connection, name: str, settings: Settings) -> int:
    webhook = db.get_webhook(conn, name)
    if webhook is None:
        print(f"no webhook named {name!r}", file=sys.stderr)
        return 1
    killmail = sample_killmail(conn)
    name_ids(conn, settings, killmail)
    killmail = notifications.post_fields(conn, killmail, webhook)
    options = notifications.SenderOptions(user_agent=settings.esi_user_agent or "killmail-worker webhooks test")
    with requests.Session() as session:
        response, error = notifications.post(session, webhook["format"], webhook["url"], killmail, options)
    if response is None or not response.ok:
        print(f"❌ {name}: {error if response is None else f'HTTP {response.status_code}'}", file=sys.stderr)
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
        return test_webhook(conn, args.name, settings)


if __name__ == "__main__":
    sys.exit(main())
