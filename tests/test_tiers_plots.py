"""`bench tiers`' charts (bench/tiers_plots.py): the distributions and the
harvest points come from the report's own samples and ratios."""

from __future__ import annotations

import re

from flexserve.bench.tiers_plots import cumulative, harvest_points, render


def test_cumulative_is_the_share_of_samples_at_or_below_each_value() -> None:
    assert cumulative([3.0, 1.0, 2.0]) == [(1.0, 1 / 3), (2.0, 2 / 3), (3.0, 1.0)]
    thinned = cumulative([float(i) for i in range(1000)], points=100)
    assert len(thinned) == 101 and thinned[-1] == (999.0, 1.0)
    assert cumulative([]) == []


def ratio(name: str, value: float | None) -> dict[str, object]:
    return {"ratio": name, "value": value}


RATIOS = [
    ratio("B/A default TTFT p99", 2.5), ratio("B/A default TPOT p99", 1.6), ratio("B/D engine output tokens/s", 1.05),
    ratio("P/A default TTFT p99 (engine-side step policy)", 0.97),
    ratio("P/A default TPOT p99 (engine-side step policy)", 1.18),
    ratio("P/D engine output tokens/s (engine-side step policy)", 0.85),
    ratio("C/A default TTFT p99 (contrast)", None),  # not run: no point
    ratio("B/E engine output tokens/s (same mix)", 0.9),  # not a harvest ratio
]


def test_harvest_points_pair_each_scenarios_output_with_its_latency_ratios() -> None:
    assert harvest_points(RATIOS) == {
        "B": {"ttft": (1.05, 2.5), "tpot": (1.05, 1.6)},
        "P": {"ttft": (0.85, 0.97), "tpot": (0.85, 1.18)},
    }


def test_the_page_draws_every_scenario_and_the_goals() -> None:
    report = {
        "command": "flexserve bench tiers --quick",
        "scenarios": {
            "A": {"default_ttft_samples_ms": [5.0, 6.0, 9.0], "default_tpot_samples_ms": [2.0, 2.5]},
            "B": {"default_ttft_samples_ms": [7.0, 20.0, 60.0], "default_tpot_samples_ms": [3.0, 4.0]},
        },
        "ratios": RATIOS,
    }
    page = render(report)
    figures = re.findall(r"<figure>.*?</figure>", page, re.S)
    assert len(figures) == 4
    ttft, tpot, harvest_ttft, _ = figures
    for chart in (ttft, tpot):
        assert chart.count("<polyline") == 2 and ">A</text>" in chart and ">B</text>" in chart
    # One marker per scenario; P's output is exactly the 0.85 goal: on its rule.
    circles = dict((name, float(x)) for x, name in re.findall(r'<circle cx="([\d.]+)"[^>]*><title>(\w+)</title>',
                                                             harvest_ttft))
    assert set(circles) == {"B", "P"}
    rules = [float(x) for x in re.findall(r'<line x1="([\d.]+)" x2="\1" y1="20"[^>]*stroke-dasharray', harvest_ttft)]
    assert rules == [circles["P"]]
    assert "flexserve bench tiers --quick" in page
