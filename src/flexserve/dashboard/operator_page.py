"""The operator's page: HTML rendered on the server, charts as inline SVG
(``charts.py``), decisions as forms carrying the session's CSRF token."""

from __future__ import annotations

import datetime
from html import escape
from typing import Any

from flexserve.dashboard.charts import TIER_COLOURS, bars, clock_label, day_label, legend, stacked
from flexserve.dashboard.operator import Latency, OperatorView
from flexserve.dashboard.pages import amount_cell, page, seconds, sign_out, usd
from flexserve.observability.history import Sample

TIERS = ("priority", "default", "flex", "batch")
# Upper bounds of the flex-wait histogram's bins, seconds (the last is open).
WAIT_BINS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0)


def operator_page(view: OperatorView, csrf: str) -> str:
    return page("FlexServe: operator", f"""
<h1>FlexServe operator <span class="muted">({escape(view.operator)})</span></h1>
{sign_out(csrf)}
<h2>Engines, last hour (this gateway's sequences by tier; dashed: capacity)</h2>
{legend(TIERS)}
{_engines(view.samples)}
<h2>Spare capacity now</h2>
{_spare(view.spare)}
<h2>Gateway queue, last hour</h2>
{_queue(view.samples)}
<h2>Flex waits, last hour ({len(view.flex_waits)} served)</h2>
{_waits(view.flex_waits)}
<h2>429s and preemptions per minute, last hour</h2>
{_minutes(view.minutes)}
<h2>Default latency, last hour</h2>
{_latency(view.latency)}
<h2>Revenue, last {view.days} days (UTC)</h2>
<p id="revenue">Charged: <span class="amount" data-pico="{view.revenue}">{usd(view.revenue)}</span>;
saved by flex and batch: <span class="amount" data-pico="{view.saved}">{usd(view.saved)}</span></p>
{_revenue(view)}
<h2>Organizations, last {view.days} days</h2>
{_orgs(view)}
<h2>Verification queue ({len(view.pending)})</h2>
{_pending(view, csrf)}
<h2>Batches in flight ({len(view.batches)})</h2>
{_batches(view)}
<h2>Capacity plan</h2>
{_plan(view.plan)}""")


def _plan(plan: dict[str, Any] | None) -> str:
    """The last `flexserve plan` run into this gateway's home (docs/plan.md)."""
    if plan is None:
        return ('<p id="plan">No plan yet: <code>flexserve plan</code> writes one here '
                "(docs/plan.md).</p>")
    summary, model = plan["summary"], plan["model"]
    sold = bars("Flex output tokens sellable per hour",
                [(f"{h['hour']:02d}:00", h["flex_output_tokens"]) for h in plan["hours"]],
                lambda v: f"{v:,.0f} tokens", height=110, colour=TIER_COLOURS["flex"])
    revenue = ", ".join(f"{escape(t)} ${escape(v)}" for t, v in summary["revenue_per_day_usd"].items())
    return (f'<div id="plan"><p>{escape(str(plan.get("created", "")))}: {model["replicas"]} × '
            f'{escape(model["profile"])}; {escape(plan["traffic"])}.</p>'
            f'<p>Within the SLO all day: {"yes" if summary["within_slo_all_day"] else "no"}; flex sellable: '
            f'<span id="plan-flex">{summary["flex_output_tokens_per_day"]:,}</span> output tokens a day'
            f'{"; revenue a day: " + revenue if revenue else ""}.</p>{sold}</div>')


def _engines(samples: list[Sample]) -> str:
    names = sorted({r.name for s in samples for r in s.replicas})
    if not names:
        return "<p>No samples yet.</p>"
    charts = []
    for name in names:
        times, ceiling = [], []
        series: dict[str, list[float]] = {tier: [] for tier in TIERS}
        for sample in samples:
            replica = next((r for r in sample.replicas if r.name == name), None)
            if replica is None:
                continue
            times.append(sample.at)
            ceiling.append(float(replica.capacity))
            for tier in TIERS:
                series[tier].append(float(replica.in_flight.get(tier, 0)))
        charts.append(f'<h3>{escape(name)}</h3>'
                      + stacked(f"Sequences on {name} by tier", times, series, ceiling=ceiling))
    return f'<div id="engines">{"".join(charts)}</div>'


def _queue(samples: list[Sample]) -> str:
    times = [s.at for s in samples]
    series = {tier: [float(s.queued.get(tier, 0)) for s in samples] for tier in TIERS}
    return f'<div id="queue">{stacked("Requests queued by tier", times, series)}</div>'


def _spare(spare: list[dict[str, object]]) -> str:
    rows = "".join(
        f"<tr><td>{escape(str(s['model']))}</td><td>{float(str(s['spare_capacity'])):.0%}</td>"
        f"<td>{s['queue_depth']}</td><td>{_maybe_seconds(s['estimated_wait_seconds'])}</td>"
        f"<td>{'yes' if s['accepting'] else 'no'}</td></tr>" for s in spare
    ) or '<tr><td colspan="5">No models.</td></tr>'
    return ('<table id="spare"><tr><th>model</th><th>spare for flex</th><th>flex queued</th>'
            f'<th>flex wait now</th><th>accepting flex</th></tr>{rows}</table>')


def _maybe_seconds(value: object) -> str:
    return seconds(None if value is None else float(str(value)))


def _waits(waits: list[float]) -> str:
    if not waits:
        return '<p id="flex-waits">No flex request served in the last hour.</p>'
    counts = [0] * (len(WAIT_BINS) + 1)
    for wait in waits:
        counts[next((i for i, top in enumerate(WAIT_BINS) if wait < top), len(WAIT_BINS))] += 1
    names = [f"< {top:g} s" for top in WAIT_BINS] + [f"≥ {WAIT_BINS[-1]:g} s"]
    chart = bars("Flex waits", list(zip(names, counts, strict=True)), lambda n: f"{n:g} requests",
                 width=420, colour=TIER_COLOURS["flex"])
    cells = "".join(f"<td>{n}</td>" for n in counts)
    heads = "".join(f"<th>{escape(n)}</th>" for n in names)
    return f'<div id="flex-waits">{chart}<table><tr>{heads}</tr><tr>{cells}</tr></table></div>'


def _minutes(minutes: list[tuple[int, int, int]]) -> str:
    if not minutes:
        return "<p>No samples yet.</p>"
    refused = bars("429s per minute", [(clock_label(m), r) for m, r, _ in minutes], lambda n: f"{n:g}",
                   height=110, colour="#ff7f0e")
    preempted = bars("Preemptions per minute", [(clock_label(m), p) for m, _, p in minutes],
                     lambda n: f"{n:g}", height=110, colour="#8c564b")
    total_refused = sum(r for _, r, _ in minutes)
    total_preempted = sum(p for _, _, p in minutes)
    return (f'<div id="events"><p>429s: <span id="refused-hour">{total_refused}</span></p>{refused}'
            f'<p>Preemptions: <span id="preempted-hour">{total_preempted}</span></p>{preempted}</div>')


def _latency(latency: list[Latency]) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f} ms"

    rows = []
    for entry in latency:
        if entry.slo is None:
            verdict = "no SLO set"
        elif entry.p99 is None:
            verdict = f"SLO {cell(entry.slo)}"
        else:
            verdict = f"SLO {cell(entry.slo)}: {'within' if entry.p99 <= entry.slo else 'OVER'}"
        rows.append(f"<tr><td>{entry.name}</td><td>{entry.num}</td><td>{cell(entry.p50)}</td>"
                    f"<td>{cell(entry.p99)}</td><td>{verdict}</td></tr>")
    body = "".join(rows) or '<tr><td colspan="5">No samples yet.</td></tr>'
    return ('<table id="latency"><tr><th>default</th><th>requests</th><th>p50</th><th>p99</th>'
            f'<th>p99 against the SLO</th></tr>{body}</table>')


def _revenue(view: OperatorView) -> str:
    chart = bars("Revenue per day", [(day_label(day), sum(tiers.values())) for day, tiers, _ in view.daily],
                 lambda pico: usd(int(pico)))
    totals: dict[str, int] = {}
    for _, tiers, _ in view.daily:
        for tier, pico in tiers.items():
            totals[tier] = totals.get(tier, 0) + pico
    saved = bars("Saved by flex and batch per day", [(day_label(day), s) for day, _, s in view.daily],
                 lambda pico: usd(int(pico)), height=110, colour=TIER_COLOURS["flex"])
    rows = "".join(f"<tr><td>{escape(tier)}</td>{amount_cell(pico)}</tr>"
                   for tier, pico in sorted(totals.items())) or '<tr><td colspan="2">Nothing yet.</td></tr>'
    return (f'{chart}<p>Saved by flex and batch, per day:</p>{saved}'
            f'<table id="revenue-by-tier"><tr><th>tier</th><th>charged</th></tr>{rows}</table>')


def _orgs(view: OperatorView) -> str:
    rows = "".join(
        f'<tr data-org="{escape(o.org_id)}"><td>{escape(o.name)}</td><td>{escape(o.verification)}</td>'
        f"<td>{o.requests}</td><td>{o.tokens}</td>{amount_cell(o.charged)}{amount_cell(o.saved)}</tr>"
        for o in view.orgs) or '<tr><td colspan="6">No organizations.</td></tr>'
    return ('<table id="orgs"><tr><th>organization</th><th>verification</th><th>requests</th>'
            f'<th>tokens</th><th>charged</th><th>saved</th></tr>{rows}</table>')


def _pending(view: OperatorView, csrf: str) -> str:
    if not view.pending:
        return '<p id="verifications">No document is waiting.</p>'
    token = f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
    rows = []
    for p in view.pending:
        org = f'<input type="hidden" name="org" value="{escape(p.org_name)}">'
        submitted = datetime.datetime.fromtimestamp(p.submitted_at, datetime.UTC).strftime("%Y-%m-%d %H:%M")
        rows.append(
            f'<tr><td>{escape(p.org_name)}</td><td>{escape(p.document_type)}</td><td>{escape(p.country)}</td>'
            f"<td>{submitted}</td>"
            f'<td><form class="inline" method="post" action="/dashboard/verification/approve">{token}{org}'
            '<button type="submit">Approve</button></form></td>'
            f'<td><form class="inline" method="post" action="/dashboard/verification/reject">{token}{org}'
            '<input type="text" name="reason" required placeholder="reason" size="24">'
            '<button type="submit">Reject</button></form></td></tr>')
    return ('<table id="verifications"><tr><th>organization</th><th>document</th><th>country</th>'
            f'<th>submitted (UTC)</th><th></th><th></th></tr>{"".join(rows)}</table>')


def _batches(view: OperatorView) -> str:
    rows = "".join(
        f"<tr><td>{escape(b.id)}</td><td>{escape(view.org_names.get(b.org_id, b.org_id))}</td>"
        f"<td>{escape(b.status)}</td><td>{b.completed} / {b.total}</td><td>{b.failed}</td>"
        f"{amount_cell(b.cost_pico)}</tr>" for b in view.batches
    ) or '<tr><td colspan="6">No batch in flight.</td></tr>'
    return ('<table id="batches"><tr><th>batch</th><th>organization</th><th>status</th>'
            f'<th>done / lines</th><th>failed</th><th>cost so far</th></tr>{rows}</table>')
