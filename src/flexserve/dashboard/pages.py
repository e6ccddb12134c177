"""The dashboard's HTML, rendered on the server: no script at all, charts as
inline SVG, one stylesheet (``STYLE``, served from /dashboard/style.css so
that the Content-Security-Policy can forbid inline styles).

Amounts are the ledger's integer pico-dollars, shown in dollars and carried
exactly in ``data-pico`` attributes (what the tests compare with the costs
API).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

from flexserve.billing.cost import pico_to_usd

STYLE = """
body { font-family: sans-serif; margin: 2rem; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
table { border-collapse: collapse; } td, th { padding: .25rem .75rem; border-bottom: 1px solid #ddd; }
td.amount { text-align: right; font-variant-numeric: tabular-nums; }
.error { color: #a00; } form.inline { display: inline; } .muted { color: #777; }
"""


@dataclass(frozen=True, slots=True)
class BatchRow:
    id: str
    status: str
    total: int
    completed: int
    failed: int
    cost_pico: int


@dataclass
class OrgView:
    """What an organization's page shows, for the last ``days`` UTC days."""

    org_name: str
    days: int
    # (day's unix start, pico-dollars charged that day), oldest first, every day.
    daily: list[tuple[int, int]] = field(default_factory=list)
    # (model, served tier, pico-dollars, requests)
    by_model_tier: list[tuple[str, str, int]] = field(default_factory=list)
    # (tier, charged, at list price)
    savings: list[tuple[str, int, int]] = field(default_factory=list)
    # The latest batches, newest first.
    batches: list[BatchRow] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(pico for _, pico in self.daily)


def _usd(pico: int) -> str:
    return f"${pico_to_usd(pico):,.6f}"


def _amount_cell(pico: int) -> str:
    return f'<td class="amount" data-pico="{pico}">{_usd(pico)}</td>'


def _page(title: str, body: str) -> str:
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><link rel=\"stylesheet\" href=\"/dashboard/style.css\">"
            f"</head><body>{body}</body></html>")


def login_page(csrf: str, error: str | None = None) -> str:
    message = f'<p class="error">{escape(error)}</p>' if error else ""
    return _page("FlexServe: sign in", f"""
<h1>FlexServe dashboard</h1>{message}
<form method="post" action="/dashboard/login">
<p><label>An admin key of your organization<br>
<input type="password" name="key" autocomplete="off" required size="60"></label></p>
<input type="hidden" name="csrf" value="{escape(csrf)}">
<p><button type="submit">Sign in</button></p>
</form>
<p class="muted">The key is sent once, to open a session; it is not kept, and never put in a URL.</p>""")


def _bars(daily: Sequence[tuple[int, int]], width: int = 720, height: int = 180) -> str:
    """Spend per day as an SVG bar chart."""
    if not daily:
        return ""
    top = max(pico for _, pico in daily) or 1
    step = width / len(daily)
    bars = []
    for i, (day, pico) in enumerate(daily):
        h = (height - 20) * pico / top
        label = datetime.datetime.fromtimestamp(day, datetime.UTC).strftime("%Y-%m-%d")
        bars.append(f'<rect x="{i * step + 1:.1f}" y="{height - 20 - h:.1f}" width="{step - 2:.1f}" '
                    f'height="{h:.1f}" fill="#1f77b4"><title>{label}: {_usd(pico)}</title></rect>')
    first = datetime.datetime.fromtimestamp(daily[0][0], datetime.UTC).strftime("%Y-%m-%d")
    last = datetime.datetime.fromtimestamp(daily[-1][0], datetime.UTC).strftime("%Y-%m-%d")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="Spend per day" font-family="sans-serif" font-size="11">{"".join(bars)}'
            f'<text x="0" y="{height - 4}">{first}</text>'
            f'<text x="{width}" y="{height - 4}" text-anchor="end">{last}</text></svg>')


def org_page(view: OrgView, csrf: str) -> str:
    rows = "".join(f"<tr><td>{escape(model)}</td><td>{escape(tier)}</td>{_amount_cell(pico)}</tr>"
                   for model, tier, pico in view.by_model_tier) or '<tr><td colspan="3">Nothing yet.</td></tr>'
    saved = "".join(
        f"<tr><td>{escape(tier)}</td>{_amount_cell(cost)}{_amount_cell(listed)}{_amount_cell(listed - cost)}</tr>"
        for tier, cost, listed in view.savings) or '<tr><td colspan="4">No flex or batch use yet.</td></tr>'
    batches = "".join(
        f"<tr><td>{escape(b.id)}</td><td>{escape(b.status)}</td><td>{b.completed} / {b.total}</td>"
        f"<td>{b.failed}</td>{_amount_cell(b.cost_pico)}</tr>"
        for b in view.batches) or '<tr><td colspan="5">No batches.</td></tr>'
    return _page(f"FlexServe: {view.org_name}", f"""
<h1>{escape(view.org_name)}</h1>
<form class="inline" method="post" action="/dashboard/logout">
<input type="hidden" name="csrf" value="{escape(csrf)}"><button type="submit">Sign out</button></form>
<h2>Spend, last {view.days} days (UTC)</h2>
<p id="total">Total: <span class="amount" data-pico="{view.total}">{_usd(view.total)}</span></p>
{_bars(view.daily)}
<h2>By model and tier</h2>
<table id="by-model-tier"><tr><th>model</th><th>tier</th><th>charged</th></tr>{rows}</table>
<h2>Savings from flex and batch</h2>
<table id="savings"><tr><th>tier</th><th>charged</th><th>at default price</th><th>saved</th></tr>{saved}</table>
<h2>Batches (latest {len(view.batches)})</h2>
<table id="batches"><tr><th>batch</th><th>status</th><th>done / lines</th><th>failed</th><th>cost so far</th></tr>
{batches}</table>""")
