"""killmail_model.py: the real sample flattens into rows; bodies off ESI's schema raise InvalidKillmail; generated
and mutated bodies raise nothing else, and whatever is accepted is stored."""
from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import db
from killmail_model import AttackerRow, InvalidKillmail, ItemRow, KillmailRow, parse_killmail
from strategies import PROPERTY, hostile_killmail_body, json_value, killmail_body, mutate, nested

SAMPLE_PATH = Path(__file__).resolve().parent / "data/killmail_134265477.json"
SAMPLE = json.loads(SAMPLE_PATH.read_text())
SAMPLE_ID = 134265477
HASH = "f" * 40


def parse(body, killmail_id=SAMPLE_ID):
    return parse_killmail(body, killmail_id=killmail_id, killmail_hash=HASH)


def sample():
    return copy.deepcopy(SAMPLE)


def minimal(**top):
    body = {"killmail_id": 1, "killmail_time": "2026-01-01T00:00:00Z", "solar_system_id": 30000142,
            "victim": {"damage_taken": 100, "ship_type_id": 587}, "attackers": []}
    body.update(top)
    return body


# ------------------------------------------------------------------------------------------------ the sample

def test_the_rows_fields_are_the_columns_db_inserts_in_their_order():
    assert list(KillmailRow._fields) == db.KILLMAIL_COLUMN_NAMES
    assert list(AttackerRow._fields) == db.ATTACKER_COLUMN_NAMES
    assert list(ItemRow._fields) == db.ITEM_COLUMN_NAMES


def test_the_real_sample_parses_into_one_killmail_row():
    killmail = parse(sample())
    row = killmail.row
    assert killmail.killmail_id == SAMPLE_ID
    assert row.killmail_id == SAMPLE_ID and row.killmail_hash == HASH
    assert row.killmail_time == datetime(2026, 3, 25, 14, 26, 36, tzinfo=UTC)
    assert row.solar_system_id == 30000743
    assert (row.moon_id, row.war_id) == (None, None)
    assert row.victim_character_id == 2121652582
    assert row.victim_corporation_id == 98366055
    assert row.victim_alliance_id == 1354830081
    assert row.victim_faction_id is None
    assert (row.victim_ship_type_id, row.victim_damage_taken) == (17478, 14136)
    assert (row.position_x, row.position_y, row.position_z) == \
        (-84679075260.99292, -37815568744.85742, 84616162342.0539)


def test_the_raw_body_is_kept_as_sent():
    body = sample()
    killmail = parse(body)
    assert json.loads(killmail.row.raw) == SAMPLE
    assert body == SAMPLE    # parsing does not change the body
    text = SAMPLE_PATH.read_text()
    as_sent = parse_killmail(body, killmail_id=SAMPLE_ID, killmail_hash=HASH, raw=text)
    assert as_sent.row.raw is text   # the text ESI sent is stored as it is


def test_the_sample_has_one_attacker_and_security_status_5_is_a_number():
    attackers = parse(sample()).attackers
    assert len(attackers) == 1
    assert attackers[0]._asdict() == {
        "killmail_id": SAMPLE_ID, "attacker_index": 0, "character_id": 96424385, "corporation_id": 98601573,
        "alliance_id": 99013537, "faction_id": None, "ship_type_id": 35683, "weapon_type_id": 3178,
        "damage_done": 14136, "final_blow": True, "security_status": 5.0,
    }


def test_the_sample_has_18_item_rows_with_duplicate_type_and_flag_kept_apart():
    items = [row._asdict() for row in parse(sample()).items]
    assert len(items) == 18
    assert [item["item_index"] for item in items] == list(range(18))
    assert all(item["parent_index"] is None for item in items)
    same = [(i["quantity_destroyed"], i["quantity_dropped"]) for i in items
            if (i["item_type_id"], i["flag"]) == (82313, 134)]
    assert same == [(16379, None), (None, 14108)]
    pairs = [(i["item_type_id"], i["flag"]) for i in items]
    assert len(set(pairs)) == 15       # three (type, flag) pairs appear twice, once destroyed and once dropped


@pytest.mark.parametrize("security_status", [5, -9.9, 0, 0.0, 4.97])
def test_security_status_accepts_ints_and_floats(security_status):
    body = minimal(attackers=[{"damage_done": 1, "final_blow": True, "security_status": security_status}])
    assert parse(body, 1).attackers[0].security_status == float(security_status)


@pytest.mark.parametrize("stamp", ["2026-03-25T14:26:36Z", "2026-03-25T14:26:36+00:00", "2026-03-25T14:26:36.000Z"])
def test_killmail_time_forms(stamp):
    body = minimal(killmail_time=stamp)
    assert parse(body, 1).row.killmail_time == datetime(2026, 3, 25, 14, 26, 36, tzinfo=UTC)


def test_the_edges_of_the_stored_integer_ranges_are_kept():
    body = minimal(war_id=2 ** 63 - 1, victim={"damage_taken": -2 ** 63, "ship_type_id": 1, "items": [
        {"flag": 2 ** 31 - 1, "item_type_id": 2 ** 63 - 1, "singleton": -2 ** 31, "quantity_destroyed": 1}]})
    killmail = parse(body, 1)
    assert killmail.row.war_id == 2 ** 63 - 1
    item = killmail.items[0]
    assert (item.flag, item.singleton, item.item_type_id) == (2 ** 31 - 1, -2 ** 31, 2 ** 63 - 1)


def test_big_ids_are_kept():
    body = minimal(killmail_id=2 ** 40, war_id=2 ** 33, moon_id=40000001)
    row = parse(body, 2 ** 40).row
    assert (row.killmail_id, row.war_id, row.moon_id) == (2 ** 40, 2 ** 33, 40000001)


# ------------------------------------------------------------------------------------------------ shapes

def test_nested_container_items_point_at_their_parent():
    body = minimal(victim={"damage_taken": 1, "ship_type_id": 2, "items": [
        {"flag": 5, "item_type_id": 10, "singleton": 0, "quantity_destroyed": 1},
        {"flag": 5, "item_type_id": 11, "singleton": 0, "quantity_dropped": 1, "items": [
            {"flag": 5, "item_type_id": 12, "singleton": 0, "quantity_destroyed": 3},
            {"flag": 5, "item_type_id": 12, "singleton": 0, "quantity_dropped": 4},
        ]},
        {"flag": 27, "item_type_id": 13, "singleton": 1, "quantity_destroyed": 1, "items": []},
    ]})
    items = [row._asdict() for row in parse(body, 1).items]
    assert [(i["item_index"], i["parent_index"], i["item_type_id"]) for i in items] == [
        (0, None, 10), (1, None, 11), (2, 1, 12), (3, 1, 12), (4, None, 13),
    ]
    assert [(i["quantity_destroyed"], i["quantity_dropped"]) for i in items[2:4]] == [(3, None), (None, 4)]


def test_identical_npc_attackers_stay_separate_rows():
    npc = {"corporation_id": 1000125, "faction_id": 500021, "ship_type_id": 3789, "damage_done": 50,
           "final_blow": False, "security_status": 0}
    body = minimal(attackers=[dict(npc), dict(npc), dict(npc, final_blow=True)])
    attackers = [row._asdict() for row in parse(body, 1).attackers]
    assert [a["attacker_index"] for a in attackers] == [0, 1, 2]
    assert all(a["character_id"] is None for a in attackers)
    assert attackers[0] == dict(attackers[1], attacker_index=0)


def test_a_victim_without_character_is_fine():
    body = minimal(victim={"damage_taken": 5000, "ship_type_id": 35832, "corporation_id": 98000001})
    row = parse(body, 1).row
    assert row.victim_character_id is None
    assert row.victim_corporation_id == 98000001
    assert (row.position_x, row.position_y, row.position_z) == (None, None, None)


def test_no_attackers_and_no_items_are_empty_lists():
    killmail = parse(minimal(), 1)
    assert killmail.attackers == [] and killmail.items == []


# ------------------------------------------------------------------------------------------------ invalid bodies

def without(path):
    """The sample with one key removed; path is a tuple of keys and list indexes."""
    body = sample()
    target = body
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return body


def replaced(path, value):
    """The sample with one value replaced."""
    body = sample()
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


@pytest.mark.parametrize("body, field", [
    (without(("victim",)), "killmail.victim"),
    (without(("attackers",)), "killmail.attackers"),
    (replaced(("killmail_id",), SAMPLE_ID + 1), "killmail_id"),
    (without(("killmail_id",)), "killmail_id"),
    (replaced(("victim", "damage_taken"), "14136"), "victim.damage_taken"),
    (without(("victim", "damage_taken")), "damage_taken"),
    (replaced(("victim", "ship_type_id"), True), "ship_type_id"),
    (replaced(("solar_system_id",), True), "killmail.solar_system_id"),
    (without(("solar_system_id",)), "solar_system_id"),
    (replaced(("victim", "character_id"), 1.5), "character_id"),
    (replaced(("attackers", 0, "damage_done"), False), "attackers[0].damage_done"),
    (replaced(("victim", "items", 0, "flag"), True), "victim.items.flag"),
    (without(("victim", "items", 0, "item_type_id")), "victim.items.item_type_id"),
    (without(("victim", "items", 0, "singleton")), "victim.items.singleton"),
    (replaced(("killmail_time",), "yesterday"), "killmail.killmail_time"),
    (replaced(("killmail_time",), "2026-03-25T14:26:36"), "killmail_time"),   # no time zone
    (replaced(("killmail_time",), 1774448796), "killmail_time"),
    (without(("killmail_time",)), "killmail_time"),
    (replaced(("attackers", 0, "final_blow"), "true"), "attackers[0].final_blow"),
    (replaced(("attackers", 0, "final_blow"), 1), "final_blow"),
    (without(("attackers", 0, "final_blow")), "final_blow"),
    (without(("attackers", 0, "security_status")), "security_status"),
    (replaced(("attackers", 0, "security_status"), "5"), "attackers[0].security_status"),
    (replaced(("attackers", 0, "security_status"), True), "security_status"),
    (replaced(("victim", "position", "x"), "1.0"), "victim.position.x"),
    (without(("victim", "position", "z")), "victim.position.z"),
    (replaced(("victim", "position"), [1, 2, 3]), "victim.position"),
    (replaced(("victim",), []), "killmail.victim"),
    (replaced(("attackers",), {}), "killmail.attackers"),
    (replaced(("attackers", 0), "npc"), "attackers[0]"),
    (replaced(("victim", "items"), {}), "victim.items"),
    (replaced(("victim", "items", 0), 17482), "victim.items"),
    (replaced(("victim", "items", 0, "items"), "none"), "victim.items[].items"),
    (replaced(("victim", "items", 0, "flag"), 2 ** 31), "victim.items.flag is out of range"),
    (replaced(("victim", "items", 0, "singleton"), -2 ** 31 - 1), "victim.items.singleton is out of range"),
    (replaced(("attackers", 0, "damage_done"), 2 ** 63), "attackers[0].damage_done is out of range"),
    (replaced(("victim", "items", 0, "quantity_dropped"), -2 ** 63 - 1), "quantity_dropped is out of range"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_invalid_body_names_the_field(body, field):
    with pytest.raises(InvalidKillmail) as caught:
        parse(body)
    assert field in str(caught.value)


@pytest.mark.parametrize("body", [None, [], "killmail", 134265477])
def test_a_body_that_is_not_an_object_is_invalid(body):
    with pytest.raises(InvalidKillmail, match="killmail"):
        parse(body)


def test_invalid_killmail_is_a_value_error():
    assert issubclass(InvalidKillmail, ValueError)


@pytest.mark.parametrize("where, value", [
    (("victim", "position", "x"), 10 ** 400),      # an integer no float can hold
    (("victim", "position", "y"), -(10 ** 309)),
    (("attackers", 0, "security_status"), 10 ** 400),
])
def test_a_number_too_large_for_a_float_is_an_invalid_killmail(where, value):
    body = copy.deepcopy(SAMPLE)
    target = body
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    with pytest.raises(InvalidKillmail, match="too large|out of range|must be a number"):
        parse(body)


def test_a_body_the_model_recurses_too_deep_on_is_an_invalid_killmail(monkeypatch):
    import killmail_model

    def too_deep(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(killmail_model, "_item_row", too_deep)
    with pytest.raises(InvalidKillmail, match="nested too deep"):
        parse(copy.deepcopy(SAMPLE))



@pytest.mark.parametrize("extra", [float("nan"), float("-inf"), "\x00", "a\ud800b", {"\udc00": 1}, [["\x00"]]],
                         ids=["nan", "-inf", "nul", "lone-high-surrogate", "lone-low-surrogate-key", "nested-nul"])
def test_a_body_jsonb_would_refuse_is_an_invalid_killmail(extra):
    body = dict(sample(), x_new=extra)  # a field ESI might add: stored in raw, so it must be storable
    with pytest.raises(InvalidKillmail, match="JSON|jsonb"):
        parse(body)
    raw = json.dumps(body)  # as text: NaN, -Infinity, \u0000, \ud800 (what Python's json decodes)
    with pytest.raises(InvalidKillmail, match="JSON|jsonb"):
        parse_killmail(json.loads(raw), killmail_id=SAMPLE_ID, killmail_hash=HASH, raw=raw)


def test_an_integer_past_pythons_text_limit_is_an_invalid_killmail():
    with pytest.raises(InvalidKillmail, match="number JSON cannot hold"):
        parse(dict(sample(), x_new=10 ** 5000))



@pytest.mark.parametrize("where, value", [
    (("victim", "character_id"), nested(5000)),
    (("victim", "character_id"), 10 ** 5000),
    (("victim", "position", "x"), [10 ** 5000]),
    (("killmail_time",), "2026" + "x" * 100_000),
], ids=["deep-id", "huge-id", "huge-in-a-list-position", "long-time"])
def test_a_deep_or_huge_value_out_of_place_is_an_invalid_killmail_naming_its_field(where, value):
    with pytest.raises(InvalidKillmail, match=where[-1]) as caught:
        parse(replaced(where, value))
    assert len(str(caught.value)) < 200  # shown cut short, not printed whole

def test_escapes_and_capitals_jsonb_takes_are_kept():
    raw = json.dumps(dict(sample(), x_new=["\ud83d\ude00", "é", "NaN", "Infinity", "\\u0000"]))
    assert parse_killmail(json.loads(raw), killmail_id=SAMPLE_ID, killmail_hash=HASH, raw=raw).row.raw == raw


# ------------------------------------------------------------------------------------------------ properties


def verdict(body, raw=None):
    """The model's answer for a body fetched under its own id: a Killmail, or None when it raised its own error.
    Anything else it raises fails the test that asked."""
    own_id = body.get("killmail_id") if isinstance(body, dict) else None
    try:
        return parse_killmail(body, killmail_id=own_id if type(own_id) is int else 1, killmail_hash=HASH, raw=raw)
    except InvalidKillmail:
        return None


def as_sent(data, body) -> tuple[str, object] | None:
    """The body as ESI could have sent it (layout and escaping drawn from `data`) and as esi.get_killmail
    hands it over: its text, and the text decoded. None when no JSON text is that body or decodes (too deep, a
    number past Python's text limit)."""
    ensure_ascii = data.draw(st.booleans(), label="ensure_ascii")
    try:
        raw = json.dumps(body, ensure_ascii=ensure_ascii, sort_keys=data.draw(st.booleans(), label="sort_keys"),
                         separators=data.draw(st.sampled_from([(",", ":"), (", ", ": ")]), label="separators"))
        try:
            raw.encode("utf-8")  # esi.py decodes the bytes as UTF-8: a lone surrogate can only come escaped
        except UnicodeEncodeError:
            raw = json.dumps(body)
        return raw, json.loads(raw)
    except (ValueError, RecursionError):
        return None


@settings(PROPERTY, max_examples=500)
@given(json_value)
def test_any_json_value_is_a_killmail_or_an_invalid_killmail(value):
    verdict(value)


@settings(PROPERTY, max_examples=600)
@given(st.data())
def test_a_mutated_killmail_is_a_killmail_or_an_invalid_killmail_and_keeps_its_text(data):
    body = mutate(data, data.draw(hostile_killmail_body, label="body"))
    event("accepted" if verdict(body) else "refused")
    sent = as_sent(data, body)
    if sent is not None:
        raw, decoded = sent
        killmail = verdict(decoded, raw)
        assert killmail is None or killmail.row.raw == raw


@settings(PROPERTY)
@given(st.data())
def test_a_body_of_esis_schema_is_accepted_whole_with_its_text(data):
    body = data.draw(killmail_body, label="body")
    raw, decoded = as_sent(data, body)
    killmail = verdict(decoded, raw)
    assert killmail is not None
    row = killmail.row
    assert (row.killmail_id, row.solar_system_id, row.raw) == \
        (body["killmail_id"], body["solar_system_id"], raw)
    assert len(killmail.attackers) == len(body["attackers"])
    assert len(killmail.items) == sum(1 + len(i.get("items", [])) for i in body["victim"].get("items", []))


@settings(PROPERTY)
@given(data=st.data())
def test_every_killmail_the_model_accepts_is_stored_with_its_text(conn, data):
    """Whatever the model lets through, PostgreSQL stores: raw equal (as jsonb) to the text that came in, every
    attacker and item row. Unknown fields hold anything (NaN, NUL, lone surrogates, deep nesting)."""
    body = data.draw(hostile_killmail_body, label="body")
    raw, decoded = as_sent(data, body) or (None, body)
    killmail = verdict(decoded, raw)
    event("refused by the model" if killmail is None else "stored")  # shown by --hypothesis-show-statistics
    if killmail is None:
        return
    assert raw is None or killmail.row.raw == raw
    try:
        assert db.save_killmails(conn, [killmail]) == [killmail.killmail_id]
        stored = conn.execute(
            "SELECT raw = %s::jsonb AS same, (SELECT count(*) FROM attackers) AS a, "
            "(SELECT count(*) FROM killmail_items) AS i FROM killmails",
            (killmail.row.raw,)).fetchone()
    finally:
        conn.rollback()
    assert stored == {"same": True, "a": len(killmail.attackers), "i": len(killmail.items)}
