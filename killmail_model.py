"""Validate an ESI killmail body and flatten it into the rows of killmails, attackers and killmail_items."""
from __future__ import annotations

import json
import math
import re
import reprlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NamedTuple, overload


class InvalidKillmail(ValueError):
    """A killmail body that does not match ESI's schema (missing required field, wrong type)."""


# The rows are tuples in the column order of db.py's inserts (unnest and COPY take them as they are); their
# fields are the columns' names.
class KillmailRow(NamedTuple):
    """A killmails row: the killmail, its victim (who died in what, where), and the raw JSON text last."""

    killmail_id: int
    killmail_hash: str
    killmail_time: datetime
    solar_system_id: int
    moon_id: int | None
    war_id: int | None
    victim_character_id: int | None
    victim_corporation_id: int | None
    victim_alliance_id: int | None
    victim_faction_id: int | None
    victim_ship_type_id: int
    victim_damage_taken: int
    position_x: float | None
    position_y: float | None
    position_z: float | None
    raw: str


class AttackerRow(NamedTuple):
    """An attackers row: one attacker of a killmail, in ESI's order (attacker_index)."""

    killmail_id: int
    attacker_index: int
    character_id: int | None
    corporation_id: int | None
    alliance_id: int | None
    faction_id: int | None
    ship_type_id: int | None
    weapon_type_id: int | None
    damage_done: int
    final_blow: bool
    security_status: float


class ItemRow(NamedTuple):
    """A killmail_items row: one item entry of the victim, a container's contents after it (parent_index)."""

    killmail_id: int
    item_index: int
    parent_index: int | None
    flag: int
    item_type_id: int
    singleton: int
    quantity_destroyed: int | None
    quantity_dropped: int | None


@dataclass(frozen=True)
class Killmail:
    """One validated killmail: its killmails row, attacker rows and item rows."""

    killmail_id: int
    row: KillmailRow
    attackers: list[AttackerRow]
    items: list[ItemRow]


INT64 = 2 ** 63     # ESI's integers are int64, as are the columns they go to,
INT32 = 2 ** 31     # but for the item flag and singleton, stored as INTEGER (both small numbers)

# What Python's json takes and PostgreSQL's jsonb refuses: NaN and Infinity, and a NUL character or a lone
# surrogate in a string (both only ever written as \u escapes). A body's text with no backslash, N or I, as every
# body ESI sends, holds none of them. (A number past numeric's range, thousands of digits long, is the database's
# to refuse: the row fails and is counted like any other refused row.)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _shown(value: Any) -> str:
    """A value as an error shows it: cut short in length and depth (a hostile body's may be deep or huge)."""
    try:
        return reprlib.repr(value)
    except ValueError:  # an integer past Python's limit on digits, somewhere in it
        return f"a {type(value).__name__} holding an integer too long to print"


@overload
def _int(obj: dict, key: str, where: str, *, required: Literal[True], bound: int = INT64) -> int: ...
@overload
def _int(obj: dict, key: str, where: str, *, required: bool = False, bound: int = INT64) -> int | None: ...
def _int(obj: dict, key: str, where: str, *, required: bool = False, bound: int = INT64) -> int | None:
    value = obj.get(key)
    if type(value) is int and -bound <= value < bound:  # the usual case first (a bool is no int here)
        return value
    if value is None:
        if required:
            raise InvalidKillmail(f"{where}.{key} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidKillmail(f"{where}.{key} must be an integer, got {_shown(value)}")
    if not -bound <= value < bound:
        raise InvalidKillmail(f"{where}.{key} is out of range: {_shown(value)}")
    return value


def _number(obj: dict, key: str, where: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidKillmail(f"{where}.{key} must be a number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        raise InvalidKillmail(f"{where}.{key} is too large for a number") from None
    if not math.isfinite(number):
        raise InvalidKillmail(f"{where}.{key} is out of range: {number}")
    return number


@overload
def _object(obj: dict, key: str, where: str, *, required: Literal[True] = True) -> dict: ...
@overload
def _object(obj: dict, key: str, where: str, *, required: bool) -> dict | None: ...
def _object(obj: dict, key: str, where: str, *, required: bool = True) -> dict | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, dict):
        raise InvalidKillmail(f"{where}.{key} must be an object")
    return value


def _list(obj: dict, key: str, where: str, *, required: bool) -> list:
    value = obj.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise InvalidKillmail(f"{where}.{key} must be a list")
    return value


def _time(obj: dict, key: str) -> datetime:
    value = obj.get(key)
    if not isinstance(value, str):
        raise InvalidKillmail(f"killmail.{key} is missing")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidKillmail(f"killmail.{key} is not an ISO 8601 time: {_shown(value)}") from None
    if parsed.tzinfo is None:
        raise InvalidKillmail(f"killmail.{key} has no time zone: {_shown(value)}")
    return parsed


def parse_killmail(body: Any, *, killmail_id: int, killmail_hash: str, raw: str | None = None) -> Killmail:
    """Check a detail body against ESI's schema and the id it was fetched for; raise InvalidKillmail if off.

    `raw` is the body's JSON text as ESI sent it, stored as it is; without it the body is serialised here.
    """
    # Whatever a hostile body makes Python raise is this body's fault: the reference fails with a reason, rather
    # than the job on every retry with the reference's attempts never counted.
    try:
        return _parse(body, killmail_id, killmail_hash, raw)
    except RecursionError:
        raise InvalidKillmail("killmail is nested too deep") from None
    except OverflowError:
        raise InvalidKillmail("killmail holds a number too large") from None


def _parse(body: Any, killmail_id: int, killmail_hash: str, raw: str | None) -> Killmail:
    if not isinstance(body, dict):
        raise InvalidKillmail("killmail must be an object")
    if _int(body, "killmail_id", "killmail", required=True) != killmail_id:
        raise InvalidKillmail(f"killmail.killmail_id is {body.get('killmail_id')}, fetched as {killmail_id}")
    victim = _object(body, "victim", "killmail")
    position = _object(victim, "position", "victim", required=False)
    coords: tuple[float | None, float | None, float | None] = (None, None, None)
    if position is not None:
        coords = (_number(position, "x", "victim.position"), _number(position, "y", "victim.position"),
                  _number(position, "z", "victim.position"))
    row = KillmailRow(
        killmail_id, killmail_hash, _time(body, "killmail_time"),
        _int(body, "solar_system_id", "killmail", required=True),
        _int(body, "moon_id", "killmail"), _int(body, "war_id", "killmail"),
        _int(victim, "character_id", "victim"), _int(victim, "corporation_id", "victim"),
        _int(victim, "alliance_id", "victim"), _int(victim, "faction_id", "victim"),
        _int(victim, "ship_type_id", "victim", required=True),
        _int(victim, "damage_taken", "victim", required=True),
        *coords, _storable(body if raw is None else None, raw),
    )
    attackers = [_attacker_row(killmail_id, index, entry)
                 for index, entry in enumerate(_list(body, "attackers", "killmail", required=True))]
    items: list[ItemRow] = []
    for entry in _list(victim, "items", "victim", required=False):
        parent_index = len(items)
        items.append(_item_row(killmail_id, parent_index, None, entry, "victim.items"))
        for child in _list(entry, "items", "victim.items[]", required=False):
            items.append(_item_row(killmail_id, len(items), parent_index, child, "victim.items[].items"))
    return Killmail(killmail_id, row, attackers, items)


def _storable(body: Any, raw: str | None) -> str:
    """The body's JSON text (`raw`, or `body` serialised), once sure that PostgreSQL's jsonb takes it."""
    if raw is None:
        try:
            raw = json.dumps(body, allow_nan=False)
        except ValueError:  # NaN or an infinity; an integer past Python's limit on digits
            raise InvalidKillmail("killmail holds a number JSON cannot hold") from None
    if "\\" not in raw and "N" not in raw and "I" not in raw:  # one character each: memchr, not a substring search
        return raw
    try:
        decoded = json.loads(raw, parse_constant=_refuse_constant)
    except InvalidKillmail:
        raise
    except ValueError:
        raise InvalidKillmail("killmail text is not JSON") from None
    todo = [decoded]
    while todo:
        value = todo.pop()
        if isinstance(value, str):
            if _UNSTORABLE.search(value):
                raise InvalidKillmail("killmail holds a NUL character or a lone surrogate, which jsonb refuses")
        elif isinstance(value, dict):
            todo.extend(value)
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
    return raw


def _refuse_constant(name: str) -> None:
    raise InvalidKillmail(f"killmail holds {name}, which JSON does not have")


def _attacker_row(killmail_id: int, index: int, entry: Any) -> AttackerRow:
    where = f"attackers[{index}]"
    if not isinstance(entry, dict):
        raise InvalidKillmail(f"{where} must be an object")
    final_blow = entry.get("final_blow")
    if not isinstance(final_blow, bool):
        raise InvalidKillmail(f"{where}.final_blow must be true or false")
    return AttackerRow(
        killmail_id, index,
        _int(entry, "character_id", where), _int(entry, "corporation_id", where),
        _int(entry, "alliance_id", where), _int(entry, "faction_id", where),
        _int(entry, "ship_type_id", where), _int(entry, "weapon_type_id", where),
        _int(entry, "damage_done", where, required=True), final_blow,
        _number(entry, "security_status", where),
    )


def _item_row(killmail_id: int, index: int, parent_index: int | None, entry: Any, where: str) -> ItemRow:
    if not isinstance(entry, dict):
        raise InvalidKillmail(f"{where} entries must be objects")
    return ItemRow(
        killmail_id, index, parent_index,
        _int(entry, "flag", where, required=True, bound=INT32), _int(entry, "item_type_id", where, required=True),
        _int(entry, "singleton", where, required=True, bound=INT32),
        _int(entry, "quantity_destroyed", where), _int(entry, "quantity_dropped", where),
    )


def named_ids(killmail: Killmail) -> set[int]:
    """The ids of a killmail that the API, the pages and the posts show by name: its system, the victim's and
    the final blow's character, corporation, alliance, faction and ship. (Every attacker and item would be tens
    of ids a killmail, named for nobody to read.)"""
    row = killmail.row
    ids = {row.solar_system_id, row.victim_character_id, row.victim_corporation_id, row.victim_alliance_id,
           row.victim_faction_id, row.victim_ship_type_id}
    for attacker in killmail.attackers:
        if attacker.final_blow:
            ids.update((attacker.character_id, attacker.corporation_id, attacker.alliance_id, attacker.faction_id,
                        attacker.ship_type_id))
    return {i for i in ids if i is not None}
