"""The dashboard's HTML, rendered on the server: no script at all, charts as
inline SVG, one stylesheet (``STYLE``, served from /dashboard/style.css so
that the Content-Security-Policy can forbid inline styles).

Amounts are the ledger's integer pico-dollars, shown in dollars and carried
exactly in ``data-pico`` attributes (what the tests compare with the costs
API).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

from flexserve.billing.cost import pico_to_usd
from flexserve.dashboard.charts import bars, day_label

STYLE = """
h3 { font-size: .95rem; margin: 1rem 0 .25rem; }
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
    org_id: str = ""


@dataclass(frozen=True, slots=True)
class RateRow:
    """A tier's rate limit and what the last minute used of it."""

    tier: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    requests_used: int
    tokens_used: int


@dataclass(frozen=True, slots=True)
class FlexHour:
    """The last hour of an organization's flex requests (this gateway's)."""

    served: int
    refused: int  # 429s, never billed
    wait_p50: float | None  # seconds in the queue
    wait_p90: float | None

    @property
    def refusal_rate(self) -> float | None:
        asked = self.served + self.refused
        return self.refused / asked if asked else None


@dataclass
class OrgView:
    """What an organization's page shows, for the last ``days`` UTC days."""

    org_name: str
    days: int
    # (day's unix start, pico-dollars charged that day), oldest first, every day.
    daily: list[tuple[int, int]] = field(default_factory=list)
    # (model, served tier, pico-dollars)
    by_model_tier: list[tuple[str, str, int]] = field(default_factory=list)
    # (tier, charged, at list price)
    savings: list[tuple[str, int, int]] = field(default_factory=list)
    # The latest batches, newest first.
    batches: list[BatchRow] = field(default_factory=list)
    budget: int | None = None  # monthly, pico-dollars; None: no budget
    month_spent: int = 0  # this calendar month so far, pico-dollars
    rates: list[RateRow] = field(default_factory=list)
    flex: FlexHour = field(default_factory=lambda: FlexHour(0, 0, None, None))

    @property
    def total(self) -> int:
        return sum(pico for _, pico in self.daily)


def usd(pico: int) -> str:
    return f"${pico_to_usd(pico):,.6f}"


def amount_cell(pico: int) -> str:
    return f'<td class="amount" data-pico="{pico}">{usd(pico)}</td>'


def page(title: str, body: str) -> str:
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><link rel=\"stylesheet\" href=\"/dashboard/style.css\">"
            f"</head><body>{body}</body></html>")


def login_page(csrf: str, error: str | None = None) -> str:
    message = f'<p class="error">{escape(error)}</p>' if error else ""
    return page("FlexServe: sign in", f"""
<h1>FlexServe dashboard</h1>{message}
<form method="post" action="/dashboard/login">
<p><label>An admin key of your organization, or an operator's key<br>
<input type="password" name="key" autocomplete="off" required size="60"></label></p>
<input type="hidden" name="csrf" value="{escape(csrf)}">
<p><button type="submit">Sign in</button></p>
</form>
<p class="muted">The key is sent once, to open a session; it is not kept, and never put in a URL.</p>""")


def sign_out(csrf: str) -> str:
    return ('<form class="inline" method="post" action="/dashboard/logout">'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}"><button type="submit">Sign out</button></form>')


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _budget(view: OrgView) -> str:
    spent = f'<span class="amount" data-pico="{view.month_spent}">{usd(view.month_spent)}</span>'
    if view.budget is None:
        return f'<p id="budget">This month: {spent}; no monthly budget.</p>'
    share = view.month_spent / view.budget if view.budget else 1.0
    return (f'<p id="budget">This month: {spent} of a budget of <span class="amount" '
            f'data-pico="{view.budget}">{usd(view.budget)}</span> ({share:.0%} used).</p>')


def _flex_hour(flex: FlexHour) -> str:
    rate = "-" if flex.refusal_rate is None else f"{flex.refusal_rate:.0%}"
    return ('<h2>Flex, last hour</h2><table id="flex-hour"><tr><th>served</th><th>refused (429)</th>'
            '<th>refusal rate</th><th>wait p50</th><th>wait p90</th></tr>'
            f'<tr><td>{flex.served}</td><td>{flex.refused}</td><td>{rate}</td>'
            f'<td>{seconds(flex.wait_p50)}</td><td>{seconds(flex.wait_p90)}</td></tr></table>')


def _limit(limit: int | None, used: int) -> str:
    if limit is None:
        return f"<td>{used}</td><td>no limit</td>"
    return f"<td>{used} / {limit}</td><td>{max(limit - used, 0)}</td>"


def _rates(rates: list[RateRow]) -> str:
    if not rates:
        return '<h2>Rate limits</h2><p id="rates">No rate limits set.</p>'
    rows = "".join(f"<tr><td>{escape(r.tier)}</td>{_limit(r.requests_per_minute, r.requests_used)}"
                   f"{_limit(r.tokens_per_minute, r.tokens_used)}</tr>" for r in rates)
    return ('<h2>Rate limits (last minute)</h2><table id="rates"><tr><th>tier</th><th>requests used</th>'
            f'<th>requests left</th><th>tokens used</th><th>tokens left</th></tr>{rows}</table>')


def org_page(view: OrgView, csrf: str) -> str:
    rows = "".join(f"<tr><td>{escape(model)}</td><td>{escape(tier)}</td>{amount_cell(pico)}</tr>"
                   for model, tier, pico in view.by_model_tier) or '<tr><td colspan="3">Nothing yet.</td></tr>'
    saved = "".join(
        f"<tr><td>{escape(tier)}</td>{amount_cell(cost)}{amount_cell(listed)}{amount_cell(listed - cost)}</tr>"
        for tier, cost, listed in view.savings) or '<tr><td colspan="4">No flex or batch use yet.</td></tr>'
    batches = "".join(
        f"<tr><td>{escape(b.id)}</td><td>{escape(b.status)}</td><td>{b.completed} / {b.total}</td>"
        f"<td>{b.failed}</td>{amount_cell(b.cost_pico)}</tr>"
        for b in view.batches) or '<tr><td colspan="5">No batches.</td></tr>'
    spend = bars("Spend per day", [(day_label(day), pico) for day, pico in view.daily],
                 lambda pico: usd(int(pico)))
    return page(f"FlexServe: {view.org_name}", f"""
<h1>{escape(view.org_name)}</h1>
{sign_out(csrf)}
<h2>Spend, last {view.days} days (UTC)</h2>
<p id="total">Total: <span class="amount" data-pico="{view.total}">{usd(view.total)}</span></p>
{spend}
{_budget(view)}
{_flex_hour(view.flex)}
{_rates(view.rates)}
<h2>By model and tier</h2>
<table id="by-model-tier"><tr><th>model</th><th>tier</th><th>charged</th></tr>{rows}</table>
<h2>Savings from flex and batch</h2>
<table id="savings"><tr><th>tier</th><th>charged</th><th>at default price</th><th>saved</th></tr>{saved}</table>
<h2>Batches (latest {len(view.batches)})</h2>
<table id="batches"><tr><th>batch</th><th>status</th><th>done / lines</th><th>failed</th><th>cost so far</th></tr>
{batches}</table>""")
