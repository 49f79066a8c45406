"""The web app's API, behind the APP_API_TOKEN bearer token: the seed's syncMyKillmails mutation and myKillmails
query as JSON routes. The app (web/__init__.py) serves it beside the operators' pages, which have a password of
their own.

- `POST /api/sync/<character_id>` queues the pilot now, at high priority: `{"success": true, "message": "Queued
  <name> at high priority"}` (or that it is already queued), 404 for an unknown pilot, 503 when the broker fails.
- `GET /api/characters/<character_id>/killmails?limit=20&before=<killmail_id>` pages its kills and losses, newest
  first, each with `is_loss`, its ISK values (destroyed_value, dropped_value, total_value; null until valued), a
  victim summary, the attacker count and the final blow, every id with its `<field>_name` beside it (null when
  not known yet); `next_before` pages on.
Every route answers 404 while APP_API_TOKEN is unset, and 401 without `Authorization: Bearer <APP_API_TOKEN>`.
"""
from __future__ import annotations

import hmac
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from flask import Blueprint, jsonify, request

import broker
import db
from enqueue import BrokerUnavailable, queue_one_now

from .sources import Sources


def api_blueprint(sources: Sources) -> Blueprint:
    """The /api routes, reading settings and the database from sources."""
    blueprint = Blueprint("api", __name__, url_prefix="/api")

    @blueprint.before_request
    def require_api_token():
        expected = sources.settings.app_api_token
        if not expected:
            return jsonify(success=False, message="the API is disabled (APP_API_TOKEN is not set)"), 404
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            return jsonify(success=False, message="a valid bearer token is required"), 401, \
                {"WWW-Authenticate": 'Bearer realm="killmail api"'}
        if not 0 < (request.view_args or {}).get("character_id", 1) <= BIGINT_MAX:
            return jsonify(success=False, message="no such character id"), 400
        return None

    @blueprint.post("/sync/<int:character_id>")
    def sync_now(character_id: int):
        """The seed's syncMyKillmails mutation: queue this pilot now, at high priority."""
        with sources.connection() as conn:
            if not db.user_exists(conn, character_id):
                return jsonify(success=False, message=f"no user with character id {character_id}"), 404
            try:
                _, message = queue_one_now(conn, sources.settings, character_id, datetime.now(UTC))
            except (BrokerUnavailable, broker.NotDelivered) as exc:
                return jsonify(success=False, message=str(exc)), 503
        return jsonify(success=True, message=message)

    @blueprint.get("/characters/<int:character_id>/killmails")
    def character_killmails(character_id: int):
        """The seed's myKillmails query: kills and losses newest first, paged by `before=<killmail_id>`."""
        try:
            limit = min(200, max(1, int(request.args.get("limit", 20))))
            before = int(request.args["before"]) if request.args.get("before") else None
        except ValueError:
            return jsonify(success=False, message="limit and before must be whole numbers"), 400
        if before is not None and not -BIGINT_MAX <= before <= BIGINT_MAX:
            return jsonify(success=False, message="before is out of range"), 400
        with sources.connection() as conn:
            if not db.user_exists(conn, character_id):
                return jsonify(success=False, message=f"no user with character id {character_id}"), 404
            rows = db.killmails_page(conn, "character", character_id, limit=limit, before=before)
            names = db.names_of(conn, (row[key] for row in rows for key in db.NAMED_COLUMNS))
        return jsonify(killmails=[killmail_summary(r, names) for r in rows],
                       next_before=rows[-1]["killmail_id"] if len(rows) == limit else None)

    return blueprint


BIGINT_MAX = 2 ** 63 - 1  # PostgreSQL's BIGINT: a bigger number is no id, and a query with it fails


def killmail_summary(row: dict, names: dict[int, str]) -> dict[str, Any]:
    """One row of db.killmails_page as the API's JSON: the killmail, its ISK values, its victim and
    its final blow, each id with its name beside it (`<field>_name`, null when not known)."""
    def named(prefix: str, fields: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in fields:
            out[field] = row[prefix + field]
            if field.endswith("_id"):
                out[field.removesuffix("_id") + "_name"] = names.get(row[prefix + field])
        return out

    return {
        "killmail_id": row["killmail_id"], "killmail_hash": row["killmail_hash"],
        "killmail_time": row["killmail_time"], **named("", ("solar_system_id",)),
        "is_loss": bool(row["is_loss"]),
        **{key: _isk(row[key]) for key in ("destroyed_value", "dropped_value", "total_value")},
        "victim": named("victim_", ("character_id", "corporation_id", "alliance_id", "ship_type_id",
                                    "damage_taken")),
        "attackers": {"count": row["attacker_count"],
                      "final_blow": named("final_blow_", ("character_id", "corporation_id", "ship_type_id"))},
    }


def _isk(value: Decimal | None) -> float | None:
    return None if value is None else float(value)
