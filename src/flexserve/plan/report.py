"""The planner's report: a JSON document and an HTML page of charts
(inline SVG, the dashboard's own ``charts.py``), and the lines it prints.

Revenue is priced at the catalogue's prices in integer pico-dollars, as the
ledger bills: a day's tokens (rounded to whole tokens) times the tier's
price per token.
"""

from __future__ import annotations

import datetime
import html
from pathlib import Path
from typing import Any

import orjson

from flexserve.billing.cost import pico_to_usd
from flexserve.billing.pricing import PriceCatalog
from flexserve.dashboard.charts import TIER_COLOURS, bars, legend
from flexserve.engines.sim.profiles import PROFILES
from flexserve.plan.day import DayPlan, day_summary
from flexserve.plan.simulate import ms
from flexserve.tiers import ServiceTier

TIERS = ("priority", "default", "flex")


def revenue(plan: DayPlan, catalog: PriceCatalog, model: str) -> dict[str, int]:
    """Pico-dollars a day per tier at the catalogue's prices (empty: no price)."""
    earned: dict[str, int] = {}
    for tier in TIERS:
        price = catalog.price(model, ServiceTier(tier))
        if price is None:
            return {}
        prompt = round(plan.tokens_per_day(tier, "prompt"))
        output = round(plan.tokens_per_day(tier, "output"))
        if prompt or output:
            earned[tier] = prompt * price.input + output * price.output
    return earned


# Where each sim profile's step times come from (engines/sim/profiles.py).
CALIBRATION = {
    "h100-llama3-8b": "step times from Vidur's H100 Llama-3-8B measurements (5.6 ms for one token, "
                      "6.4 ms for 128, prefill ~47k tokens/s), KV reads at ~3 TB/s",
    "a100-llama3-8b": "step times from Vidur's A100 Llama-3-8B measurements (9.7 ms for one token, "
                      "13.2 ms for 128, 67 us per token beyond), KV reads at ~2 TB/s",
    "instant": "no cost at all (for tests): not a model of any engine",
}


def calibration(profile: str) -> str:
    return CALIBRATION.get(profile, "a profile without a stated calibration" if profile in PROFILES
                           else "unknown profile")


def report(plan: DayPlan, catalog: PriceCatalog, model: str, command: str,
           sizing: dict[str, Any] | None = None, sweep: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    earned = revenue(plan, catalog, model)
    total = sum(earned.values())
    window = plan.window
    return {
        "report": "flexserve-plan",
        "command": command,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": {
            "engine": "sim (in-process, virtual clock)",
            "profile": window.replica.profile_name,
            "profile_calibration": window.replica.calibration or calibration(window.replica.profile_name),
            "cost_model": window.replica.cost_model,
            "max_num_seqs": window.replica.max_num_seqs,
            "prefix_caching": window.replica.prefix_caching,
            "replicas": plan.replicas,
            "how": ("each replica planned as one taking 1/replicas of the arrivals; "
                    f"{len(plan.levels)} load levels of {window.warmup:g} s warm-up + "
                    f"{window.duration:g} s measured; hours between levels interpolated"),
        },
        "traffic": plan.traffic.describe(),
        "slo": {"ttft_p99_ms": ms(plan.slo.ttft_p99), "tpot_p99_ms": ms(plan.slo.tpot_p99)},
        "flex_policy": {"flex_headroom": window.scheduler.flex_headroom, "tpot_slo": window.scheduler.tpot_slo,
                        "flex_clients": window.flex_clients},
        "summary": {
            **day_summary(plan),
            "revenue_per_day_usd": {t: str(pico_to_usd(p)) for t, p in earned.items()},
            "revenue_per_day_pico": earned,
            "flex_share_of_revenue": round(earned.get("flex", 0) / total, 4) if total else None,
            "plan_wall_seconds": round(plan.wall_seconds, 2),
        },
        "hours": [{
            "hour": h.hour, "default_rate": round(h.rate, 4), "within_slo": h.within_slo,
            "flex_headroom": h.headroom,
            "flex_output_tokens": round(h.flex_tokens),
            "output_tokens_per_second": {t: round(v, 1) for t, v in sorted(h.output_tps.items())},
            "default_ttft_p50_ms": ms(h.ttft_p50), "default_ttft_p99_ms": ms(h.ttft_p99),
            "default_tpot_p50_ms": ms(h.tpot_p50), "default_tpot_p99_ms": ms(h.tpot_p99),
            "engine_busy_ratio": round(h.busy_ratio, 3),
        } for h in plan.hours],
        "levels": [{"per_replica_rate": round(level.rate, 4), "flex_headroom": level.headroom,
                    "within_slo": level.within_slo, "windows": level.tried, **level.outcome.as_dict()}
                   for level in plan.levels],
        **({"sizing": sizing} if sizing is not None else {}),
        **({"sweep": sweep} if sweep is not None else {}),
    }


def write(out: Path, document: dict[str, Any], plan: DayPlan) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "plan.json", out / "plan.html"
    json_path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    html_path.write_text(page(document, plan))
    return json_path, html_path


def page(document: dict[str, Any], plan: DayPlan) -> str:
    hours = plan.hours
    labels = [f"{h.hour:02d}:00" for h in hours]
    flex = bars("Flex output tokens sellable per hour", list(zip(labels, [h.flex_tokens for h in hours],
                strict=True)), lambda v: f"{v:,.0f} tokens", colour=TIER_COLOURS["flex"])
    tokens = "".join(
        f"<h3>{tier}</h3>" + bars(f"{tier} output tokens/s", list(zip(
            labels, [h.output_tps.get(tier, 0.0) for h in hours], strict=True)),
            lambda v: f"{v:,.0f} tokens/s", height=110, colour=TIER_COLOURS[tier])
        for tier in ("default", "flex"))
    slo_ttft, slo_tpot = document["slo"]["ttft_p99_ms"], document["slo"]["tpot_p99_ms"]
    ttft = bars("Default TTFT p99 per hour", list(zip(labels, [(h.ttft_p99 or 0) * 1000 for h in hours],
                strict=True)), lambda v: f"{v:.1f} ms", height=110, colour=TIER_COLOURS["default"],
                goal=None if slo_ttft is None else ("SLO", slo_ttft))
    tpot = bars("Default TPOT p99 per hour", list(zip(labels, [(h.tpot_p99 or 0) * 1000 for h in hours],
                strict=True)), lambda v: f"{v:.2f} ms", height=110, colour=TIER_COLOURS["default"],
                goal=None if slo_tpot is None else ("SLO", slo_tpot))
    summary = document["summary"]
    rows = "".join(f"<tr><td>{html.escape(t)}</td><td>${html.escape(v)}</td></tr>"
                   for t, v in summary["revenue_per_day_usd"].items())
    slo = document["slo"]
    model = document["model"]
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>FlexServe plan</title>
<style>body {{ font-family: sans-serif; margin: 2rem; }} td, th {{ padding: .2rem .6rem; }}</style></head><body>
<h1>FlexServe plan: {model['replicas']} × {html.escape(model['profile'])}</h1>
<p>{html.escape(document['traffic'])}</p>
<p>SLO: default TTFT p99 ≤ {slo['ttft_p99_ms']} ms, TPOT p99 ≤ {slo['tpot_p99_ms']} ms.
Within it all day: <b>{'yes' if summary['within_slo_all_day'] else 'no'}</b>.
Flex sellable: <b>{summary['flex_output_tokens_per_day']:,}</b> output tokens a day.</p>
<p>Engine model: {html.escape(model['profile'])} ({html.escape(model['profile_calibration'])}), cost model
{html.escape(model['cost_model'])}; {html.escape(model['how'])}.</p>
<h2>Flex sold per hour</h2>{flex}
<h2>Output tokens/s by tier (the fleet)</h2>{legend(("default", "flex"))}{tokens}
<h2>Default latency per hour (dashed: the SLO)</h2><h3>TTFT p99</h3>{ttft}<h3>TPOT p99</h3>{tpot}
<h2>Revenue per day</h2><table><tr><th>tier</th><th>USD</th></tr>{rows}</table>
<p>Flex's share of revenue: {summary['flex_share_of_revenue']}</p>
</body></html>
"""


def lines(document: dict[str, Any]) -> list[str]:
    """What the command prints."""
    summary = document["summary"]
    out = [
        f"fleet: {document['model']['replicas']} × {document['model']['profile']}; {document['traffic']}",
        f"within the SLO all day: {'yes' if summary['within_slo_all_day'] else 'NO'}; "
        f"flex sellable: {summary['flex_output_tokens_per_day']:,} output tokens/day",
    ]
    if summary["revenue_per_day_usd"]:
        out.append("revenue/day: " + ", ".join(f"{t} ${v}" for t, v in summary["revenue_per_day_usd"].items())
                   + f" (flex share {summary['flex_share_of_revenue']})")
    out.append("hour  default/s  flex tok/s  TTFT p99 ms  TPOT p99 ms  SLO")
    for h in document["hours"]:
        out.append(f"{h['hour']:02d}    {h['default_rate']:9.3f}  {h['output_tokens_per_second'].get('flex', 0):10.1f}"
                   f"  {h['default_ttft_p99_ms'] or 0:11.1f}  {h['default_tpot_p99_ms'] or 0:11.2f}  "
                   f"{'ok' if h['within_slo'] else 'MISSED'}")
    out.append(f"planned in {summary['plan_wall_seconds']} s")
    return out
