"""The compliance dashboard's HTML (served by api/compliance.py): rendered on the server from
compliance/kpis.py's :class:`~stripe_platform.compliance.kpis.Kpis`, charts as inline SVG, the
style inline (style.css). No script, no font, no request but the page itself: the first paint
needs nothing else, the machine needs no network, and the page's Content-Security-Policy allows
nothing else (:func:`security_headers`).

Each KPI card carries ``data-kpi`` (its key) and its value's element ``data-value`` (the API's
number), so a browser test finds them without reading the layout.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
from html import escape
from importlib.resources import files
from typing import Any

from stripe_platform.compliance.kpis import Deadline, Kpi, Kpis, TrendPoint, figure

SEVERITY_COLOURS = {"critical": "#8e0000", "high": "#c62828", "medium": "#e08a00", "low": "#9aa5b1"}
STATUS_COLOURS = {"ok": "#1a7f37", "warn": "#b26b00", "bad": "#c62828", "info": "#1f5fa8"}
BAR_COLOUR = "#5b7fa6"


@functools.cache
def _style() -> str:
    return (files("stripe_platform.api.dashboard") / "style.css").read_text()


def security_headers() -> dict[str, str]:
    """No script, no external anything: the one inline style is allowed by its hash."""
    digest = base64.b64encode(hashlib.sha256(_style().encode()).digest()).decode()
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'sha256-{digest}'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'"
        ),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


REFRESH_SECONDS = 300  # a dashboard left open on a wall reloads itself (no script needed)


def _document(title: str, header: str, body: str, *, refresh: bool = False) -> str:
    again = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">{again}'
        f"<title>{escape(title)}</title><style>{_style()}</style></head><body>"
        f"<header>{header}</header><main>{body}</main></body></html>"
    )


def _when(value: dt.datetime | None) -> str:
    return "" if value is None else f"{value.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"


# --- charts -------------------------------------------------------------------------------------


def sparkline(trend: list[TrendPoint], days: int, now: dt.datetime) -> str:
    """The KPI's trend over the window: a line through one point a day, a failed control's days in
    red; the window's first and last day under it."""
    width, height, pad = 260, 54, 6
    if not trend:
        return '<p class="empty">no history yet</p>'
    last = now.astimezone(dt.UTC).date()
    first = last - dt.timedelta(days=days - 1)
    values = [p.value for p in trend]
    low, high = min(values), max(values)
    span = (high - low) or 1.0

    def x(day: dt.date) -> float:
        return pad + (width - 2 * pad) * ((day - first).days / max(days - 1, 1))

    def y(value: float) -> float:
        return pad + (height - 2 * pad - 14) * (1 - (value - low) / span)

    coords = [(x(p.day), y(p.value)) for p in trend]
    line = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords)
    dots = "".join(
        f'<circle class="point" cx="{cx:.1f}" cy="{cy:.1f}" r="3" '
        f'fill="{STATUS_COLOURS["bad"] if p.passed is False else BAR_COLOUR}">'
        f"<title>{p.day}: {p.value:g}</title></circle>"
        for (cx, cy), p in zip(coords, trend, strict=True)
    )
    return (
        f'<svg class="trend" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" aria-label="trend over {days} days">'
        f'<polyline points="{line}" fill="none" stroke="{BAR_COLOUR}" stroke-width="2"/>{dots}'
        f'<text x="{pad}" y="{height - 2}">{first:%d %b}</text>'
        f'<text x="{width - pad}" y="{height - 2}" text-anchor="end">{last:%d %b}</text></svg>'
    )


def bars(values: dict[str, float], colours: dict[str, str] | None = None) -> str:
    """A small horizontal bar chart, one labelled bar per item (incidents by severity, requests
    by state)."""
    if not values:
        return ""
    width, row, label_w = 260, 16, 96
    top = max(values.values()) or 1.0
    height = row * len(values)
    rows = []
    for i, (name, n) in enumerate(values.items()):
        w = (width - label_w - 30) * n / top
        fill = (colours or {}).get(name, BAR_COLOUR)
        y = i * row
        rows.append(
            f'<g class="bar" data-name="{escape(name)}" data-count="{n:g}">'
            f'<text x="0" y="{y + 12}">{escape(name)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - 5}" fill="{fill}"/>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + 12}">{n:g}</text></g>'
        )
    return (
        f'<svg class="bars" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">{"".join(rows)}</svg>'
    )


def gauge(percent: float, status: str) -> str:
    """A percentage as a filled bar."""
    width = 260
    filled = width * max(0.0, min(percent, 100.0)) / 100
    colour = STATUS_COLOURS.get(status, BAR_COLOUR)
    return (
        f'<svg class="gauge" role="img" width="{width}" height="10" viewBox="0 0 {width} 10">'
        f'<rect x="0" y="0" width="{width}" height="10" rx="3" fill="#e3e8ee"/>'
        f'<rect x="0" y="0" width="{filled:.1f}" height="10" rx="3" fill="{colour}"/></svg>'
    )


def deadlines_chart(deadlines: list[Deadline], horizon_days: float) -> str:
    """Open privacy requests and breach clocks against their legal deadlines: one bar a clock, its
    length the time left (red when past the deadline, amber within a week)."""
    if not deadlines:
        return '<p class="empty">no open request or breach clock</p>'
    width, row, label_w = 720, 20, 300
    scale = (width - label_w - 80) / max(horizon_days, 1)
    rows = []
    for i, d in enumerate(deadlines):
        y = i * row
        left = d.days_left
        colour = (
            STATUS_COLOURS["bad"]
            if d.overdue
            else STATUS_COLOURS["warn"]
            if left <= 7
            else STATUS_COLOURS["ok"]
        )
        w = max(abs(left) * scale, 2)
        said = f"{-left:.1f} d overdue" if d.overdue else f"{left:.1f} d left"
        rows.append(
            f'<g class="deadline" data-kind="{d.kind}" data-id="{escape(d.id)}">'
            f'<text x="0" y="{y + 14}">{escape(d.kind)} {escape(d.id)}: {escape(d.label)}, '
            f"due {d.due_at.astimezone(dt.UTC):%Y-%m-%d}</text>"
            f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row - 7}" fill="{colour}"/>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + 14}">{said}</text></g>'
        )
    height = row * len(deadlines)
    return (
        f'<svg class="deadlines" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">{"".join(rows)}</svg>'
    )


# --- pages --------------------------------------------------------------------------------------


def _card(kpi: Kpi, days: int, now: dt.datetime) -> str:
    value_attr = "" if kpi.value is None else f' data-value="{kpi.value!r}"'
    chart = ""
    if kpi.key == "incidents":
        chart = bars(kpi.breakdown, SEVERITY_COLOURS)
    elif kpi.breakdown:
        chart = bars(kpi.breakdown)
    elif kpi.unit == "%" and kpi.value is not None:
        chart = gauge(kpi.value, kpi.status)
    trend = "" if kpi.status == "info" else sparkline(kpi.trend, days, now)
    as_of = f'<p class="detail">as of {_when(kpi.as_of)}</p>' if kpi.as_of else ""
    return (
        f'<article class="kpi status-{kpi.status}" data-kpi="{escape(kpi.key)}" '
        f'data-status="{kpi.status}">'
        f'<header><h3>{escape(kpi.title)}</h3><span class="badge">{kpi.status}</span></header>'
        f'<p class="value"{value_attr}>{escape(figure(kpi))}</p>'
        f'<p class="detail">{escape(kpi.detail)}</p>{as_of}{chart}{trend}'
        f'<a class="drill" href="/compliance/evidence/{escape(kpi.source)}">Evidence &rarr;</a>'
        "</article>"
    )


def dashboard(k: Kpis, *, user: str) -> str:
    """The page: the KPI cards, the deadlines chart, the consent and opt-out rates."""
    now = k.generated_at
    main = [c for c in k.kpis if c.status != "info"]
    rates = [c for c in k.kpis if c.status == "info"]
    horizon = max([45.0, *(abs(d.days_left) for d in k.deadlines)])
    header = (
        "<h1>Compliance</h1>"
        f"<p>as of {_when(now)} &middot; trends over {k.trend_days} days &middot; signed in as "
        f'{escape(user)} &middot; <a href="/v1/compliance/kpis">JSON</a></p>'
    )
    body = (
        '<h2 class="section">Controls, incidents, requests</h2><section class="grid">'
        + "".join(_card(c, k.trend_days, now) for c in main)
        + '</section><h2 class="section">Legal deadlines (privacy requests, breach '
        'notifications)</h2><section class="panel" id="deadlines">'
        + deadlines_chart(k.deadlines, horizon)
        + '</section><h2 class="section">Consent and do not sell</h2><section class="grid">'
        + "".join(_card(c, k.trend_days, now) for c in rates)
        + "</section>"
    )
    return _document("Compliance — stripe-platform", header, body, refresh=True)


def _render(value: Any) -> str:
    """JSON evidence as HTML: objects as definition lists, lists of objects as tables."""
    if isinstance(value, dict):
        if not value:
            return '<span class="empty">none</span>'
        items = "".join(f"<dt>{escape(str(k))}</dt><dd>{_render(v)}</dd>" for k, v in value.items())
        return f"<dl>{items}</dl>"
    if isinstance(value, list):
        if not value:
            return '<span class="empty">none</span>'
        if all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(k for v in value for k in v))
            head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
            rows = "".join(
                "<tr>" + "".join(f"<td>{_render(v.get(c))}</td>" for c in columns) + "</tr>"
                for v in value
            )
            return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
        return ", ".join(_render(v) for v in value)
    if value is None:
        return '<span class="empty">—</span>'
    return escape(str(value))


def evidence_page(name: str, data: dict[str, Any], *, user: str) -> str:
    title = str(data.get("title", name))
    header = (
        f"<h1>{escape(title)}</h1><p>evidence &middot; signed in as {escape(user)} &middot; "
        f'<a href="/compliance">&larr; dashboard</a> &middot; '
        f'<a href="/v1/compliance/evidence/{escape(name)}">JSON</a></p>'
    )
    shown = {k: v for k, v in data.items() if k not in ("name", "title")}
    body = f'<section class="panel" id="evidence" data-evidence="{escape(name)}">{_render(shown)}</section>'
    return _document(f"{title} — compliance evidence", header, body)


def message_page(status: int, message: str) -> str:
    """A refusal (401/403), an unknown evidence name (404) or a source down (503), said plainly."""
    said = {403: "access refused", 404: "not found", 503: "unavailable"}.get(status, "refused")
    header = (
        f'<h1>Compliance</h1><p>{status}: {said} &middot; <a href="/compliance">dashboard</a></p>'
    )
    body = f'<section class="panel" id="message"><p>{escape(message)}</p></section>'
    return _document(f"{status} {said} — stripe-platform", header, body)
