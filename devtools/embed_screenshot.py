"""Screenshot of a posted Discord embed for the docs: `python -m devtools.embed_screenshot docs/embed.png`.

The sample killmail in tests/data, its ids named as the ESI simulator names them, is posted by the sender's own
code (notifications.post) to the local webhook receiver; the embed JSON the receiver logged is rendered as a
small Discord-like HTML page and photographed with headless Chromium. The same rendering is checked by
tests/test_notifications.py.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import sys
import tempfile
from decimal import Decimal
from pathlib import Path

import requests

import db
import notifications
import webhooks
from devtools.esi_simulator import Simulator, constellation_of, region_of
from devtools.screenshot import take_screenshot
from devtools.webhook_receiver import Receiver
from killmail_model import parse_killmail

ROOT = Path(__file__).resolve().parent.parent

SAMPLE = ROOT / "tests" / "data" / "killmail_134265477.json"
SAMPLE_VALUE = Decimal("187654321.09")  # a value as the other half of issue 16 computes it
# EVE's image server is out of reach where the screenshot is taken: a grey square marks where Discord shows the
# ship's render.
OFFLINE_THUMBNAIL = ("data:image/svg+xml;utf8,<svg xmlns='http://www.w3.org/2000/svg' width='64' height='64'>"
                     "<rect width='64' height='64' fill='%23404249'/><text x='32' y='36' font-size='10' "
                     "fill='%23b5bac1' text-anchor='middle' font-family='Arial'>ship render</text></svg>")


def sample_killmail() -> dict:
    """The fields a post reads, from the sample killmail, with its ids named (and its system placed in its
    region) as the simulator names them."""
    body = json.loads(SAMPLE.read_text())
    columns = webhooks.post_columns(parse_killmail(body, killmail_id=body["killmail_id"], killmail_hash="0" * 40),
                                    total_value=SAMPLE_VALUE)
    simulator = Simulator(seed=1, client_id="embed", client_secret="embed")
    names = {column.removesuffix("_id") + "_name": (simulator.name_of(columns[column]) or {}).get("name")
             for column in db.NAMED_COLUMNS if columns[column] is not None}
    region_id = region_of(constellation_of(columns["solar_system_id"]))
    region = simulator.name_of(region_id)
    assert region is not None  # the simulator names every region
    names |= {"region_id": region_id, "region_name": region["name"]}
    # The point of view of a webhook following the victim's corporation: a loss.
    side = notifications.side_of(columns, {"character_ids": [], "corporation_ids": [columns["victim_corporation_id"]]})
    return {**columns, **names, "side": side}


def received_embed() -> dict:
    """Post the sample to a local receiver; the body it logged."""
    receiver = Receiver()
    try:
        with requests.Session() as session:
            response, error = notifications.post(session, "discord", receiver.url, sample_killmail(),
                                                 notifications.SenderOptions(user_agent="embed-screenshot/1.0"))
        assert response is not None and response.ok, error
        return receiver.bodies()[0]
    finally:
        receiver.close()


def markdown(text: str) -> str:
    """Discord's markdown as far as posts use it: [name](link) and line breaks."""
    escaped = html.escape(text)
    return re.sub(r"\[([^\]]*)\]\(([^)\s]*)\)", r'<a href="\2">\1</a>', escaped).replace("\n", "<br>")


def render(body: dict, *, thumbnail: str = "") -> str:
    """A Discord-like page showing the embeds of one webhook post (the thumbnail from a local file: the
    screenshot is taken offline)."""
    cards = []
    for embed in body["embeds"]:
        fields = "".join(
            f'<div class="field"><div class="name">{html.escape(f["name"])}</div>'
            f'<div class="value">{markdown(f["value"])}</div></div>' for f in embed["fields"])
        image = thumbnail or embed["thumbnail"]["url"]
        cards.append(
            f'<div class="embed" style="border-left-color: #{embed["color"]:06x}">'
            f'<img class="thumb" src="{html.escape(image)}" alt="ship render">'
            f'<a class="title" href="{html.escape(embed["url"])}">{html.escape(embed["title"])}</a>'
            f'<div class="fields">{fields}</div>'
            f'<div class="footer">{html.escape(embed["footer"]["text"])} · {html.escape(embed["timestamp"])}</div>'
            f'<div class="link">{html.escape(embed["url"])}</div></div>')
    return f"""<!doctype html><meta charset="utf-8"><style>
body {{ background: #313338; color: #dbdee1; font: 15px "Helvetica Neue", Arial, sans-serif; margin: 24px; }}
.author {{ color: #f2f3f5; font-weight: 600; margin-bottom: 6px; }}
.author span {{ background: #5865f2; color: white; font-size: 10px; padding: 1px 4px; border-radius: 3px; }}
.embed {{ background: #2b2d31; border-left: 4px solid; border-radius: 4px; padding: 12px 16px; max-width: 520px;
          position: relative; }}
.thumb {{ position: absolute; right: 16px; top: 12px; width: 64px; height: 64px; border-radius: 3px;
          background: #1e1f22; }}
.value a {{ color: #00a8fc; text-decoration: none; }}
.title {{ color: #00a8fc; font-weight: 600; text-decoration: none; display: block; margin: 0 80px 10px 0; }}
.fields {{ display: grid; grid-template-columns: repeat(3, 1fr); gap: 8px; }}
.name {{ color: #f2f3f5; font-weight: 600; font-size: 13px; }} .value {{ font-size: 14px; }}
.footer, .link {{ color: #949ba4; font-size: 12px; margin-top: 10px; }}
</style><div class="author">Killboard <span>BOT</span></div>{"".join(cards)}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("png", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="embed-") as folder:
        page = Path(folder) / "embed.html"
        page.write_text(render(received_embed(), thumbnail=OFFLINE_THUMBNAIL))
        take_screenshot(page.as_uri(), args.png.resolve(), height=330)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
