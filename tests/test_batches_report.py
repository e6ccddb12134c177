"""bench batches' memory figures (bench/batches_report.py)."""

from __future__ import annotations

from flexserve.bench.batches_report import rss_figures

SAMPLES = [(0.0, "before", 80.0), (1.0, "upload", 86.2), (2.0, "after", 81.0)]


def test_the_high_water_mark_is_never_below_a_sampled_peak() -> None:
    # Linux updates VmHWM lazily: a sample can pass it.
    lazy = rss_figures(SAMPLES, high_water_mib=86.1)
    assert (lazy["before"], lazy["peak"], lazy["after"], lazy["high_water_mark"]) == (80.0, 86.2, 81.0, 86.2)
    # A peak between samples, which only the kernel saw.
    unseen = rss_figures(SAMPLES, high_water_mib=90.0)
    assert unseen["high_water_mark"] == 90.0
    assert unseen["peak_by_phase"] == {"before": 80.0, "upload": 86.2, "after": 81.0}
