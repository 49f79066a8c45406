"""The /status page's charts of the last 24 hours, drawn here as inline SVG: no script and no external asset, so
the page stays one self-contained file that any browser, or a screenshot, shows as it is.

Each chart takes report.hourly()'s list. Every hour is a <g data-hour="..."> holding one <rect> per
series with its number in data-value and a <title> that a browser shows on hover; an hour with nothing in it
is drawn as zero. Every text is escaped.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from markupsafe import Markup, escape

WIDTH, HEIGHT = 380, 230
LEFT, RIGHT, TOP, BOTTOM = 46, 10, 48, 38   # room for the y labels, the title and legend, the x labels
LABEL_EVERY_HOURS = 6                        # x labels on 00:00, 06:00, 12:00 and 18:00 UTC; a tick every hour
BAR_SHARE = 0.72                             # of an hour's width; the rest is the gap between bars
KILLMAIL_COLOUR = "#3b6fd8"
OUTCOME_COLOURS = {"ok": "#2e9e6a", "partial": "#e0a526", "error": "#d64534", "needs_relogin": "#7b5fd0"}
OTHER_COLOUR = "#8a93a6"                     # an outcome not in the list above
P95_COLOUR, P50_COLOUR = "#b9c6f0", "#3b6fd8"


@dataclass(frozen=True)
class Series:
    """One row of bars: its key (data-series), its legend label, its colour and one value per hour."""

    key: str
    label: str
    colour: str
    values: Sequence[float]


@dataclass(frozen=True)
class Chart:
    """What a chart shows: the hours, the series, and how its numbers read."""

    chart_id: str
    title: str
    axis_label: str
    hours: Sequence[datetime]
    series: Sequence[Series]
    stacked: bool             # stacked bars add up; otherwise each bar stands on zero, later ones narrower in front
    fmt: Callable[[float], str]
    whole: bool               # the y axis counts in whole numbers


def killmails_chart(hourly: Sequence[dict]) -> Markup:
    """Killmails stored per hour."""
    return draw(Chart("chart-killmails", "Killmails stored per hour", "killmails", [h["hour"] for h in hourly],
                      [Series("killmails", "stored", KILLMAIL_COLOUR, [h["killmails"] for h in hourly])],
                      stacked=True, fmt=count, whole=True))


def runs_chart(hourly: Sequence[dict]) -> Markup:
    """Sync runs finished per hour, stacked by outcome: the usual four always in the legend, any other after."""
    seen = {status for h in hourly for status in h["runs"]}
    statuses = [*OUTCOME_COLOURS, *sorted(seen - OUTCOME_COLOURS.keys())]
    series = [Series(status, status.replace("_", " "), OUTCOME_COLOURS.get(status, OTHER_COLOUR),
                     [h["runs"].get(status, 0) for h in hourly]) for status in statuses]
    return draw(Chart("chart-runs", "Sync runs per hour by outcome", "runs", [h["hour"] for h in hourly], series,
                      stacked=True, fmt=count, whole=True))


def durations_chart(hourly: Sequence[dict]) -> Markup:
    """The p50 and p95 sync duration per hour, the p50 bar in front of the p95 one; an hour with no run is 0."""
    series = [Series(key, key, colour, [h[f"duration_{key}_seconds"] or 0 for h in hourly])
              for key, colour in (("p95", P95_COLOUR), ("p50", P50_COLOUR))]
    return draw(Chart("chart-durations", "Sync duration per hour", "seconds", [h["hour"] for h in hourly], series,
                      stacked=False, fmt=seconds, whole=False))


def count(value: float) -> str:
    """A count with thousands separators."""
    return f"{value:,.0f}"


def seconds(value: float) -> str:
    """Seconds with at most three significant digits: '0.4', '6.5', '125'."""
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def nice_scale(peak: float, *, whole: bool, ticks: int = 4) -> tuple[float, float]:
    """The top of a y axis and the step between its gridlines: a step of 1, 2 or 5 times a power of ten that
    covers the peak in at most `ticks` steps (at least 1 for whole numbers); (1, 1) for an empty chart."""
    if peak <= 0:
        return 1.0, 1.0
    raw = peak / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    if whole:
        step = max(1.0, step)
    return step * math.ceil(peak / step - 1e-9), step


def draw(chart: Chart) -> Markup:
    """The chart as an <svg> element, with its axes, gridlines, hour ticks and legend."""
    totals = [sum(values) if chart.stacked else max(values, default=0)
              for values in zip(*(s.values for s in chart.series), strict=True)]
    top, step = nice_scale(max(totals, default=0), whole=chart.whole)
    plot_height = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / len(chart.hours)

    def y(value: float) -> float:
        return TOP + plot_height * (1 - value / top)

    parts = [f'<svg id="{escape(chart.chart_id)}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(chart.title)}, last {len(chart.hours)} hours">',
             f'<text x="0" y="13" class="chart-title">{escape(chart.title)}</text>',
             *_legend(chart.series), *_y_axis(chart, top, step, y), *_x_axis(chart.hours, slot)]
    for n, hour in enumerate(chart.hours):
        parts.append(_hour_bars(chart, n, hour, slot, y))
    parts.append("</svg>")
    return Markup("".join(parts))


def _legend(series: Sequence[Series]) -> list[str]:
    """A swatch and a label per series, in a row under the title."""
    parts, x = [], 0
    for s in series:
        parts.append(f'<rect x="{x}" y="23" width="11" height="11" rx="2" fill="{escape(s.colour)}"></rect>'
                     f'<text x="{x + 15}" y="33" class="chart-legend">{escape(s.label)}</text>')
        x += 7 * len(s.label) + 30  # about the width of the label at the legend's font size, and a gap
    return parts


def _y_axis(chart: Chart, top: float, step: float, y: Callable[[float], float]) -> list[str]:
    parts = []
    for n in range(round(top / step) + 1):
        value, at = n * step, y(n * step)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{at:.1f}" y2="{at:.1f}" class="chart-grid"></line>'
                     f'<text x="{LEFT - 6}" y="{at + 4:.1f}" text-anchor="end" class="chart-tick">'
                     f'{escape(chart.fmt(value))}</text>')
    middle = TOP + (HEIGHT - TOP - BOTTOM) / 2
    parts.append(f'<text x="11" y="{middle:.1f}" transform="rotate(-90 11 {middle:.1f})" text-anchor="middle" '
                 f'class="chart-axis">{escape(chart.axis_label)}</text>')
    return parts


def _x_axis(hours: Sequence[datetime], slot: float) -> list[str]:
    base = HEIGHT - BOTTOM
    parts = [f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{base}" y2="{base}" class="chart-baseline"></line>']
    for n, hour in enumerate([*hours, hours[-1] + timedelta(hours=1)] if hours else []):
        x = LEFT + n * slot
        labelled = hour.hour % LABEL_EVERY_HOURS == 0
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + (6 if labelled else 3)}" '
                     f'class="chart-baseline"></line>')
        if labelled and n < len(hours):
            parts.append(f'<text x="{x:.1f}" y="{base + 18}" text-anchor="middle" class="chart-tick">'
                         f'{hour:%H:%M}</text>')
    parts.append(f'<text x="{LEFT + (WIDTH - LEFT - RIGHT) / 2:.1f}" y="{HEIGHT - 3}" text-anchor="middle" '
                 f'class="chart-axis">hour (UTC)</text>')
    return parts


def _hour_bars(chart: Chart, n: int, hour: datetime, slot: float, y: Callable[[float], float]) -> str:
    """One hour's bars and its hover text: every series, zeros too."""
    label = f"{hour:%H:%M}–{hour + timedelta(hours=1):%H:%M} UTC"
    lines = [label] + [f"{s.label}: {chart.fmt(s.values[n])}" for s in reversed(chart.series)]
    # A clear rect over the whole hour, so that an hour with nothing in it shows its hover text too.
    parts = [f'<g data-hour="{hour:%Y-%m-%dT%H:%MZ}"><title>{escape(chr(10).join(lines))}</title>'
             f'<rect x="{LEFT + n * slot:.2f}" y="{TOP}" width="{slot:.2f}" height="{HEIGHT - TOP - BOTTOM}" '
             f'fill="transparent"></rect>']
    width, left, base = slot * BAR_SHARE, LEFT + n * slot + slot * (1 - BAR_SHARE) / 2, 0.0
    for layer, s in enumerate(chart.series):
        value = s.values[n]
        shrink = 1.0 if chart.stacked else 1 - 0.4 * layer  # overlaid bars narrow, so the ones behind show
        x, w = left + width * (1 - shrink) / 2, width * shrink
        y_top, y_bottom = y(base + value), y(base)
        parts.append(f'<rect x="{x:.2f}" y="{y_top:.2f}" width="{w:.2f}" height="{y_bottom - y_top:.2f}" '
                     f'fill="{escape(s.colour)}" data-series="{escape(s.key)}" data-value="{value:g}"></rect>')
        if chart.stacked:
            base += value
    parts.append("</g>")
    return "".join(parts)
