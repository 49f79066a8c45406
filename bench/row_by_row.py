"""The seed's way of storing a killmail, a statement per row, kept for the benchmarks that compare db.save_killmails
(one COPY per table) against it."""
from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

import db


def _insert(table: str, columns: list[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})"


def save_killmail_row_by_row(conn, killmail: Any) -> bool:
    """Store one parsed killmail with a statement per row; False when it is stored already."""
    row = killmail.row
    inserted = conn.execute(
        _insert("killmails", db.KILLMAIL_COLUMN_NAMES) + " ON CONFLICT (killmail_id) DO NOTHING RETURNING killmail_id",
        (*row[:-1], Jsonb(row.raw, dumps=lambda text: text)),  # raw (last) is JSON text already, sent as it came
    ).fetchone()
    if inserted is None:
        return False
    for attacker in killmail.attackers:
        conn.execute(_insert("attackers", db.ATTACKER_COLUMN_NAMES), attacker)
    for item in killmail.items:
        conn.execute(_insert("killmail_items", db.ITEM_COLUMN_NAMES), item)
    return True
