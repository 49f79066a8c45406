"""The /status page's hourly charts: the numbers web/report.py's hourly() reads for each clock hour, and the SVG
web/charts.py draws of them, alone and on the page served by the Flask test client."""
from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

import db
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


def test_run_figures_read_the_window_once_for_the_stats_and_the_hours(known_hours):
    """The stats cover the whole window (24 hours back from NOW, 12:40); the hours start at FIRST_HOUR (13:00):
    a run between the two counts in the stats and in no hour."""
    add_run(known_hours, run(FIRST_HOUR - timedelta(minutes=10), 20.0, "partial"))
    known_hours.commit()
    first, until = web.report.charted_hours(NOW)
    assert (first, until) == (FIRST_HOUR, FIRST_HOUR + timedelta(hours=24))
    figures = db.run_figures(known_hours, NOW - timedelta(hours=24), first, until)
    # By hand: the window holds 1, 2, 3, 4, 10 (12:30), 1, 3 (11 h) and 20 (yesterday 12:50); the locked skip and
    # the run at 12:30 yesterday are out. Sorted 1, 1, 2, 3, 3, 4, 10, 20: the 95th percentile lies 0.95 * 7 = 6.65
    # places in, 10 + 0.65 * (20 - 10) = 16.5. Succeeded: 4 ok and 2 partial; failed: 1 error.
    assert figures.stats == {"runs": 8, "succeeded": 6, "failed": 1, "avg_duration": pytest.approx(44 / 8),
                             "p95_duration": pytest.approx(16.5)}
    assert [(h["hour"], h["runs"], h["p50"], h["p95"]) for h in figures.hours] == [
        (datetime(2026, 11, 1, 11, tzinfo=UTC), {"ok": 2}, 2.0, pytest.approx(2.9)),
        (NOW.replace(minute=0), {"error": 1, "needs_relogin": 1, "ok": 2, "partial": 1}, 3.0, pytest.approx(8.8))]


def test_run_figures_of_a_window_with_no_run(conn):
    add_run(conn, run(NOW - timedelta(minutes=5), 3.0, "locked"))
    conn.commit()
    first, until = web.report.charted_hours(NOW)
    figures = db.run_figures(conn, NOW - timedelta(hours=24), first, until)
    assert figures == db.RunFigures(
        {"runs": 0, "succeeded": 0, "failed": 0, "avg_duration": None, "p95_duration": None}, [])
    with pytest.raises(ValueError):
        db.run_figures(conn, first + timedelta(seconds=1), first, until)


def test_run_figures_count_a_status_recorded_first_after_the_counters_were_read(known_hours, monkeypatch):
    add_run(known_hours, run(NOW - timedelta(minutes=1), 5.0, "it's new"))
    known_hours.commit()
    counters, reads = db.runs_by_status, []

    def read_before_it(conn):  # the first read of the counters comes before the new status's run
        reads.append(counters(conn))
        return [r for r in reads[-1] if r["status"] != "it's new"] if len(reads) == 1 else reads[-1]
    monkeypatch.setattr(db, "runs_by_status", read_before_it)
    figures = db.run_figures(known_hours, NOW - timedelta(hours=24), *web.report.charted_hours(NOW))
    assert figures.hours[-1]["runs"] == {"error": 1, "it's new": 1, "needs_relogin": 1, "ok": 2, "partial": 1}
    assert figures.stats["runs"] == 8 and (figures.stats["succeeded"], figures.stats["failed"]) == (5, 1)
    assert len(reads) == 2


def test_run_figures_average_is_the_former_avg_of_extract(conn):
    """The average divides the exact sum by the count as avg over numeric seconds did: the same float, to the
    last bit, for durations whose mean has no short decimal (a third of a microsecond, sevenths)."""
    for n, micros in enumerate([100_000, 200_000, 400_000, 1, 2, 1_000_000 // 7, 3_000_001, 9_999_999]):
        add_run(conn, run(NOW - timedelta(minutes=n + 1), micros / 1e6, "ok"))
    conn.commit()
    figures = db.run_figures(conn, NOW - timedelta(hours=24), *web.report.charted_hours(NOW))
    former = conn.execute("SELECT avg(extract(epoch FROM finished_at - started_at))::float8 AS avg, "
                          "percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)) "
                          "AS p95 FROM sync_runs").fetchone()
    assert (figures.stats["avg_duration"], figures.stats["p95_duration"]) == (former["avg"], former["p95"])


def test_run_figures_read_the_runs_of_the_window_by_an_index(conn):
    """Two weeks of runs: the day's are read by an index on finished_at, the older ones not at all."""
    conn.execute("INSERT INTO sync_runs (character_id, started_at, finished_at, status) "
                 "SELECT g, f - interval '2 seconds', f, 'ok' "
                 "FROM generate_series(1, 20000) g, LATERAL (SELECT %s - g * interval '1 minute' AS f) x", (NOW,))
    conn.commit()
    with db.autocommitted(conn):
        conn.execute("VACUUM ANALYZE sync_runs")
    first, until = web.report.charted_hours(NOW)
    figures = db.run_figures(conn, NOW - timedelta(hours=24), first, until)
    assert figures.stats["runs"] == 24 * 60  # a minute apart, back to the one finished as the window starts
    plan = "\n".join(row["QUERY PLAN"] for row in conn.execute(
        "EXPLAIN (ANALYZE, COSTS OFF) " + db._run_figures_sql(["ok"]).as_string(conn),
        {"since": NOW - timedelta(hours=24), "first": first}))
    assert re.search(r"Index (Only )?Scan using sync_runs_finished\w* on sync_runs \(actual .* rows=1440 ", plan), plan
    assert "Seq Scan" not in plan, plan


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
