"""Hypothesis strategies of the property tests: any JSON value a hostile answer can hold, ESI-shaped killmail
bodies, list pages, and mutations of them.

Not a conftest.py: test_killmail_model.py and test_esi.py import these by name, as the fault tests import
fault_helpers.
"""
from __future__ import annotations

from datetime import timedelta, timezone

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

INT64 = 2 ** 63
INT32 = 2 ** 31

# Every property test runs under this: no deadline (a shared CI machine is slow at times), examples counted per
# test so that the whole file stays within seconds. The tests that take the `conn` fixture roll back after
# each example, so a connection shared across examples is what they want.
PROPERTY = settings(deadline=None, max_examples=300,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# The numbers a hostile body reaches for: the edges of int32 and int64 and just past them, zero, negative ones,
# integers far past any column, floats of every kind (NaN and the infinities included).
EDGE_INTS = [0, -1, 1, INT32 - 1, INT32, -INT32, -INT32 - 1, INT64 - 1, INT64, -INT64, -INT64 - 1, 2 ** 64,
             10 ** 40, -(10 ** 40)]
any_int = st.one_of(st.sampled_from(EDGE_INTS), st.integers(), st.integers(-(10 ** 60), 10 ** 60))
any_float = st.floats(allow_nan=True, allow_infinity=True)
any_text = st.one_of(st.text(), st.sampled_from(["", "\x00", "\ud800", "\udfff\ud800", "é", "😀", "Z", "null",
                                                 "2026-03-25T14:26:36Z", "NaN", "1e999"]))
scalar = st.one_of(st.none(), st.booleans(), any_int, any_float, any_text)


def nested(depth: int, leaf=None):
    """A list `depth` deep (lists and objects alternating), deeper than any decoder or walker expects."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"n": value}
    return value


json_value = st.one_of(
    st.recursive(scalar, lambda children: st.one_of(st.lists(children, max_size=4),
                                                    st.dictionaries(any_text, children, max_size=4)),
                 max_leaves=12),
    st.integers(50, 3000).map(nested),
)

# ---------------------------------------------------------------------------------------------- valid bodies

ids = st.integers(-INT64, INT64 - 1)
small_ints = st.integers(-INT32, INT32 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
offsets = st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59))
times = st.builds(lambda moment, offset, zulu: moment.replace(tzinfo=timezone(offset)).isoformat().replace(
    "+00:00", "Z" if zulu else "+00:00"), st.datetimes(), offsets, st.booleans())
# What PostgreSQL's jsonb stores: no NaN nor infinity, no NUL character nor lone surrogate in a string.
storable_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
storable_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10 ** 60), 10 ** 60), finite, storable_text),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(storable_text, children, max_size=4)),
    max_leaves=12)


def killmail_bodies(unknown: st.SearchStrategy) -> st.SearchStrategy:
    """Bodies as ESI's schema has them, every optional field present or not, and fields ESI may add one day
    (stored in raw as they came) holding values drawn from `unknown`."""
    def fields(required: dict, optional: dict) -> st.SearchStrategy:
        extra = st.dictionaries(storable_text.map(lambda k: "x_" + k), unknown, max_size=1)
        return st.builds(lambda a, b, c: {**a, **b, **c}, st.fixed_dictionaries(required),
                         st.fixed_dictionaries({}, optional=optional), extra)

    item = ({"flag": small_ints, "item_type_id": ids, "singleton": small_ints},
            {"quantity_destroyed": ids, "quantity_dropped": ids})
    container = st.builds(lambda entry, inner: {**entry, "items": inner} if inner is not None else entry,
                          fields(*item), st.none() | st.lists(fields(*item), max_size=2))
    attacker = fields({"damage_done": ids, "final_blow": st.booleans(), "security_status": finite},
                      dict.fromkeys(("character_id", "corporation_id", "alliance_id", "faction_id",
                                     "ship_type_id", "weapon_type_id"), ids))
    victim = fields({"damage_taken": ids, "ship_type_id": ids},
                    {"character_id": ids, "corporation_id": ids, "alliance_id": ids, "faction_id": ids,
                     "items": st.lists(container, max_size=3),
                     "position": st.fixed_dictionaries({"x": finite, "y": finite, "z": finite})})
    return fields({"killmail_id": ids, "killmail_time": times, "solar_system_id": ids, "victim": victim,
                   "attackers": st.lists(attacker, max_size=3)},
                  {"moon_id": ids, "war_id": ids})


killmail_body = killmail_bodies(storable_json)   # what the model must accept
hostile_killmail_body = killmail_bodies(json_value)   # added fields holding anything at all


# ---------------------------------------------------------------------------------------------- mutations


def paths(value, *, depth: int = 12) -> list[tuple]:
    """The places in a JSON value (object keys and list positions) down to `depth` levels, the root first."""
    found, todo = [], [((), value)]
    while todo:
        path, child = todo.pop()
        found.append(path)
        if len(path) < depth and isinstance(child, dict):
            todo.extend(((*path, key), grandchild) for key, grandchild in child.items())
        elif len(path) < depth and isinstance(child, list):
            todo.extend(((*path, index), grandchild) for index, grandchild in enumerate(child))
    return found


def mutate(data, body, *, times: int = 3):
    """`body` with up to `times` mutations drawn from `data` (in place; the root itself may be replaced): a
    field or entry removed, a value replaced by any JSON value (a wrong type, a huge or negative number, deep
    nesting, unicode), a value wrapped in a list."""
    for _ in range(data.draw(st.integers(1, times), label="mutations")):
        path = data.draw(st.sampled_from(paths(body)), label="path")
        how = data.draw(st.sampled_from(["remove", "replace", "wrap"]), label="how")
        if not path:
            body = data.draw(json_value, label="root") if how != "wrap" else [body]
            continue
        parent = body
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1]
        if how == "remove":
            del parent[key]
        elif how == "replace":
            parent[key] = data.draw(json_value, label="value")
        else:
            parent[key] = [parent[key]]
    return body
