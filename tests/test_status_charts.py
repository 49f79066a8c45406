"""The /status page's hourly charts: the numbers web/report.py's hourly() reads for each clock hour, and the SVG
web/charts.py draws of them, alone and on the page served by the Flask test client."""
from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

import web.charts
import web.report
from screenshot import add_killmail, add_run, charts_in

NOW = datetime(2026, 11, 1, 12, 40, tzinfo=UTC)
FIRST_HOUR = datetime(2026, 10, 31, 13, 0, tzinfo=UTC)   # 23 hours before NOW's hour
BROWSER = {"Accept": "text/html"}
PLOT_HEIGHT = web.charts.HEIGHT - web.charts.TOP - web.charts.BOTTOM


def run(finished: datetime, seconds: float, status: str) -> tuple:
    return (1001, finished, seconds, status, 0, 0, 0, 0, 0, 1, 1, None)


def hour_key(moment: datetime) -> str:
    """A chart's data-hour of the clock hour a time falls in."""
    return f"{moment.astimezone(UTC):%Y-%m-%dT%H}:00Z"


def empty_hours(changes: dict[int, dict] | None = None) -> list[dict]:
    """web.report.hourly()'s shape for the 24 hours from FIRST_HOUR, zeros but for these hours (by index)."""
    hours = [{"hour": FIRST_HOUR + timedelta(hours=n), "killmails": 0, "runs": {}, "duration_p50_seconds": None,
              "duration_p95_seconds": None} for n in range(24)]
    for index, values in (changes or {}).items():
        hours[index].update(values)
    return hours


@pytest.fixture
def known_hours(conn):
    """Killmails and runs on both sides of the chart's hour boundaries."""
    for n, stored in enumerate([
            datetime(2026, 11, 1, 12, 5, tzinfo=UTC), datetime(2026, 11, 1, 12, 5, tzinfo=UTC),
            datetime(2026, 11, 1, 11, 59, 59, tzinfo=UTC), datetime(2026, 11, 1, 10, 0, tzinfo=UTC),
            FIRST_HOUR,
            FIRST_HOUR - timedelta(seconds=1),                 # before the first hour: not charted
            datetime(2026, 11, 1, 13, 0, tzinfo=UTC)]):        # after the current hour: not charted
        add_killmail(conn, 150_000_001 + n, stored)
    at = datetime(2026, 11, 1, 12, 30, tzinfo=UTC)
    for seconds, status in ((1.0, "ok"), (2.0, "ok"), (3.0, "partial"), (4.0, "error"), (10.0, "needs_relogin"),
                            (100.0, "locked")):              # a locked skip synced nothing: left out
        add_run(conn, run(at, seconds, status))
    add_run(conn, run(datetime(2026, 11, 1, 11, 10, tzinfo=UTC), 1.0, "ok"))
    add_run(conn, run(datetime(2026, 11, 1, 11, 50, tzinfo=UTC), 3.0, "ok"))
    add_run(conn, run(FIRST_HOUR - timedelta(minutes=30), 50.0, "error"))
    conn.commit()
    return conn


def test_hourly_counts_each_clock_hour_of_the_last_day(known_hours):
    hours = web.report.hourly(known_hours, NOW)
    assert [h["hour"] for h in hours] == [FIRST_HOUR + timedelta(hours=n) for n in range(24)]
    assert {n: h["killmails"] for n, h in enumerate(hours) if h["killmails"]} == {0: 1, 21: 1, 22: 1, 23: 2}
    assert {n: h["runs"] for n, h in enumerate(hours) if h["runs"]} == {
        22: {"ok": 2}, 23: {"ok": 2, "partial": 1, "error": 1, "needs_relogin": 1}}
    # By hand, linear between the nearest runs: 1, 2, 3, 4, 10 has its median at 3 and its 95th percentile at
    # 0.95 * 4 = 3.8 places in, 4 + 0.8 * (10 - 4) = 8.8; 1, 3 has 2 and 1 + 0.95 * (3 - 1) = 2.9.
    assert (hours[23]["duration_p50_seconds"], hours[23]["duration_p95_seconds"]) == (3.0, pytest.approx(8.8))
    assert (hours[22]["duration_p50_seconds"], hours[22]["duration_p95_seconds"]) == (2.0, pytest.approx(2.9))
    assert all(h["duration_p50_seconds"] is None and h["duration_p95_seconds"] is None for h in hours[:22])


def test_hourly_hours_are_utc_clock_hours_whatever_the_zone_of_now(known_hours):
    tokyo = NOW.astimezone(timezone(timedelta(hours=9)))
    assert web.report.hourly(known_hours, tokyo) == web.report.hourly(known_hours, NOW)
    assert web.report.hourly(known_hours, NOW)[0]["hour"].utcoffset() == timedelta(0)


def test_the_charts_draw_each_hour_with_its_numbers(known_hours):
    hours = web.report.hourly(known_hours, NOW)
    page = "".join(chart(hours) for chart in (web.charts.killmails_chart, web.charts.runs_chart,
                                              web.charts.durations_chart))
    charts = charts_in(page)
    assert sorted(charts) == ["chart-durations", "chart-killmails", "chart-runs"]
    assert all(list(chart) == [hour_key(h["hour"]) for h in hours] for chart in charts.values())
    assert {hour: bars["killmails"] for hour, bars in charts["chart-killmails"].items() if bars["killmails"]} == {
        "2026-10-31T13:00Z": 1, "2026-11-01T10:00Z": 1, "2026-11-01T11:00Z": 1, "2026-11-01T12:00Z": 2}
    assert charts["chart-killmails"]["2026-11-01T09:00Z"] == {"killmails": 0}  # an empty hour is a zero bar
    assert charts["chart-runs"]["2026-11-01T12:00Z"] == {"ok": 2, "partial": 1, "error": 1, "needs_relogin": 1}
    assert charts["chart-runs"]["2026-11-01T11:00Z"] == {"ok": 2, "partial": 0, "error": 0, "needs_relogin": 0}
    assert charts["chart-durations"]["2026-11-01T12:00Z"] == {"p95": 8.8, "p50": 3}
    assert charts["chart-durations"]["2026-11-01T11:00Z"] == {"p95": 2.9, "p50": 2}
    assert charts["chart-durations"]["2026-11-01T09:00Z"] == {"p95": 0, "p50": 0}


def bars(svg: str, series: str) -> dict[str, tuple[float, float]]:
    """Each hour's bar of one series: where its top is, and its height."""
    return {hour: (float(top), float(height)) for hour, top, height in re.findall(
        rf'<g data-hour="([^"]+)">.*?y="([\d.]+)" width="[\d.]+" height="([\d.]+)" fill="[^"]+" '
        rf'data-series="{series}"', svg, re.S)}


def test_bar_heights_are_to_scale_and_stack():
    hours = empty_hours({22: {"killmails": 1, "runs": {"ok": 1}}, 23: {"killmails": 2, "runs": {"ok": 1, "error": 1}}})
    heights = {hour: height for hour, (_, height) in bars(web.charts.killmails_chart(hours), "killmails").items()}
    assert len(heights) == 24
    assert (heights["2026-11-01T11:00Z"], heights["2026-11-01T12:00Z"]) == (PLOT_HEIGHT / 2, PLOT_HEIGHT)
    assert set(heights.values()) == {0, PLOT_HEIGHT / 2, PLOT_HEIGHT}
    runs = web.charts.runs_chart(hours)
    (ok_top, ok_height), (error_top, error_height) = (bars(runs, s)["2026-11-01T12:00Z"] for s in ("ok", "error"))
    assert (ok_height, error_height) == (PLOT_HEIGHT / 2, PLOT_HEIGHT / 2)
    assert (error_top, error_top + error_height) == (web.charts.TOP, ok_top)  # error on ok, up to the top, 2
    assert ">0</text>" in runs and ">1</text>" in runs and ">2</text>" in runs  # the y axis' tick labels


def test_a_chart_has_axis_labels_hour_ticks_and_a_legend():
    svg = web.charts.runs_chart(empty_hours())
    assert "hour (UTC)" in svg and ">runs</text>" in svg
    assert [label for label in re.findall(r'class="chart-tick">(\d\d:\d\d)<', svg)] == [
        "18:00", "00:00", "06:00", "12:00"]
    assert svg.count('class="chart-baseline"') == 1 + 25  # the x axis, and a tick at each hour's start and end
    assert re.findall(r'class="chart-legend">([^<]+)<', svg) == ["ok", "partial", "error", "needs relogin"]


def test_chart_text_is_escaped():
    svg = web.charts.runs_chart(empty_hours({23: {"runs": {'<script>alert("x")</script>': 2}}}))
    assert "<script" not in svg
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in svg


@pytest.mark.parametrize("peak, whole, scale", [
    (0, True, (1, 1)), (2, True, (2, 1)), (3, True, (3, 1)), (7, True, (8, 2)), (100, True, (100, 50)),
    (101, True, (150, 50)), (0.4, False, (0.4, 0.1)), (0.3, False, (0.3, 0.1)), (6.5, False, (8, 2)),
    (8.8, False, (10, 5)),
])
def test_nice_scale(peak, whole, scale):
    assert web.charts.nice_scale(peak, whole=whole) == pytest.approx(scale)


@pytest.mark.parametrize("value, text", [(0, "0"), (0.30000000000000004, "0.3"), (6.5, "6.5"), (125, "125"),
                                         (3600, "3,600")])
def test_seconds(value, text):
    assert web.charts.seconds(value) == text


def test_the_status_page_charts_the_rows_in_their_hours(make_client, conn):
    client = make_client()
    now = datetime.now(UTC)
    stored, finished = now - timedelta(hours=3), now - timedelta(hours=2)  # inside the window at any minute
    for n in range(3):
        add_killmail(conn, 160_000_001 + n, stored)
    add_run(conn, run(finished, 2.0, "ok"))
    add_run(conn, run(finished, 4.0, "error"))
    conn.commit()
    page = client.get("/status", headers=BROWSER).get_data(as_text=True)
    charts = charts_in(page)
    assert [len(charts[c]) for c in ("chart-killmails", "chart-runs", "chart-durations")] == [24, 24, 24]
    assert charts["chart-killmails"][hour_key(stored)] == {"killmails": 3}
    assert sum(bars["killmails"] for bars in charts["chart-killmails"].values()) == 3
    assert charts["chart-runs"][hour_key(finished)] == {"ok": 1, "partial": 0, "error": 1, "needs_relogin": 0}
    assert charts["chart-durations"][hour_key(finished)] == {"p95": 3.9, "p50": 3}  # 2 + 0.95 * (4 - 2)
    assert "<script" not in page and not re.search(r"(src|href)=\"(https?:)?//", page)
    hourly = {hour_key(datetime.fromisoformat(h["hour"])): h
              for h in client.get("/status?format=json").get_json()["hourly"]}
    assert len(hourly) == 24
    assert (hourly[hour_key(stored)]["killmails"], hourly[hour_key(finished)]["runs"]) == (3, {"ok": 1, "error": 1})
    assert hourly[hour_key(finished)]["duration_p95_seconds"] == pytest.approx(3.9)
