"""Prices and cost arithmetic: exact integers, whatever the counts and prices."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexserve.billing.cost import (
    BILLABLE_STATUSES,
    NO_COST,
    TokenCounts,
    billed_costs,
    is_billable,
    line_costs,
    max_cost,
    pico_to_usd,
)
from flexserve.billing.price_book import read_price_file
from flexserve.billing.pricing import (
    DEFAULT_MULTIPLIERS,
    ModelPrice,
    MultiplierEntry,
    PriceCatalog,
    PriceEntry,
    PriceError,
    format_micro_usd,
    parse_multiplier,
    parse_usd,
)
from flexserve.tiers import ServiceTier

EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "flexserve" / "examples" / "prices.toml"

# Up to $1M per 1M tokens; half of them multiples of a cent per 1M tokens, for
# which every multiplier gives a whole price (the others mostly get refused).
micro_prices = st.one_of(
    st.integers(min_value=0, max_value=10**12),
    st.integers(min_value=0, max_value=10**8).map(lambda cents: cents * 10_000),
)
token_counts = st.integers(min_value=0, max_value=10**9)
multipliers_bp = st.integers(min_value=0, max_value=1_000_000)
tiers = st.sampled_from(list(ServiceTier))


def usd_per_token(price_micro: int) -> Fraction:
    """A price as the math states it: USD per 1M tokens → USD per token."""
    return Fraction(price_micro, 10**6) / 10**6


@given(
    uncached=token_counts,
    cached=token_counts,
    output=token_counts,
    price=st.tuples(micro_prices, micro_prices, micro_prices),
    multiplier=multipliers_bp,
    tier=tiers,
)
def test_cost_is_tokens_times_price_times_multiplier_exactly(
    uncached: int,
    cached: int,
    output: int,
    price: tuple[int, int, int],
    multiplier: int,
    tier: ServiceTier,
) -> None:
    list_price = ModelPrice(*price)
    entries = [PriceEntry("m", ServiceTier.DEFAULT, list_price)]
    overrides = [] if tier is ServiceTier.DEFAULT else [MultiplierEntry("m", tier, multiplier)]
    factor = Fraction(1) if tier is ServiceTier.DEFAULT else Fraction(multiplier, 10_000)
    tokens = TokenCounts(input=uncached + cached, cached_input=cached, output=output)
    try:
        catalog = PriceCatalog(entries, overrides)
    except PriceError:
        # Refused exactly when some tier's price would not be whole micro-dollars.
        factors = {t: multiplier if t is tier else DEFAULT_MULTIPLIERS[t] for t in ServiceTier}
        assert any(p * bp % 10_000 for bp in factors.values() for p in price)
        return
    tier_price = catalog.price("m", tier)
    assert tier_price is not None
    costs = line_costs(tokens, tier_price)
    expected = (
        uncached * usd_per_token(list_price.input)
        + cached * usd_per_token(list_price.cached_input)
        + output * usd_per_token(list_price.output)
    ) * factor
    assert Fraction(costs.total, 10**12) == expected
    assert pico_to_usd(costs.total) == Decimal(expected.numerator) / Decimal(expected.denominator)


@given(
    counts=st.lists(st.tuples(token_counts, token_counts), min_size=1, max_size=20),
    price=st.tuples(micro_prices, micro_prices),
)
def test_a_sum_of_request_costs_is_the_cost_of_the_summed_tokens(
    counts: list[tuple[int, int]], price: tuple[int, int]
) -> None:
    model_price = ModelPrice(price[0], price[0], price[1])
    each = sum(line_costs(TokenCounts(i, 0, o), model_price).total for i, o in counts)
    whole = line_costs(
        TokenCounts(sum(i for i, _ in counts), 0, sum(o for _, o in counts)), model_price
    )
    assert each == whole.total


def test_flex_launch_figures_from_the_example_catalog() -> None:
    catalog = PriceCatalog(*read_price_file(EXAMPLE))
    o3_flex = catalog.price("o3", ServiceTier.FLEX)
    o4_flex = catalog.price("o4-mini", ServiceTier.FLEX)
    assert o3_flex is not None and o4_flex is not None
    assert (format_micro_usd(o3_flex.input), format_micro_usd(o3_flex.output)) == ("5.00", "20.00")
    assert (format_micro_usd(o4_flex.input), format_micro_usd(o4_flex.output)) == ("0.55", "2.20")
    assert catalog.price("o3", ServiceTier.PRIORITY) == ModelPrice(
        20_000_000, 5_000_000, 80_000_000
    )
    assert catalog.price("o3", ServiceTier.BATCH) == o3_flex
    # 1M output tokens of o3 on flex: exactly twenty dollars.
    assert pico_to_usd(line_costs(TokenCounts(0, 0, 10**6), o3_flex).total) == Decimal(20)


def test_explicit_tier_prices_and_per_model_multipliers_win() -> None:
    catalog = PriceCatalog(
        [
            PriceEntry("m", ServiceTier.DEFAULT, ModelPrice(4, 4, 8)),
            PriceEntry("m", ServiceTier.FLEX, ModelPrice(3, 1, 5)),
        ],
        [
            MultiplierEntry(None, ServiceTier.PRIORITY, 30_000),
            MultiplierEntry("m", ServiceTier.BATCH, 2_500),
        ],
    )
    assert catalog.price("m", ServiceTier.FLEX) == ModelPrice(3, 1, 5)
    assert catalog.price("m", ServiceTier.PRIORITY) == ModelPrice(12, 12, 24)
    assert catalog.price("m", ServiceTier.BATCH) == ModelPrice(1, 1, 2)
    assert catalog.price("unpriced", ServiceTier.FLEX) is None
    assert catalog.multiplier_bp("other", ServiceTier.FLEX) == DEFAULT_MULTIPLIERS[ServiceTier.FLEX]


def test_a_tier_price_without_a_list_price_is_refused() -> None:
    with pytest.raises(PriceError, match="no default"):
        PriceCatalog([PriceEntry("m", ServiceTier.FLEX, ModelPrice(1, 1, 1))])
    with pytest.raises(PriceError, match="multiplier"):
        PriceCatalog([], [MultiplierEntry(None, ServiceTier.DEFAULT, 5_000)])


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("10", 10_000_000),
        ("1.10", 1_100_000),
        (1.1, 1_100_000),
        ("0.275", 275_000),
        ("0.000001", 1),
        (Decimal("4.40"), 4_400_000),
        (0, 0),
    ],
)
def test_parse_usd(text: str | float | Decimal, micro: int) -> None:
    assert parse_usd(text) == micro


@pytest.mark.parametrize("text", ["0.0000001", "-1", "nan", "inf", "ten", True, "1e7"])
def test_parse_usd_refuses(text: str | bool) -> None:
    with pytest.raises(PriceError):
        parse_usd(text)


def test_multipliers_and_formatting() -> None:
    assert parse_multiplier("0.5") == 5_000 and parse_multiplier(2) == 20_000
    with pytest.raises(PriceError):
        parse_multiplier("0.00001")
    assert format_micro_usd(1_100_000) == "1.10"
    assert format_micro_usd(137_500) == "0.1375"
    assert format_micro_usd(20_000_000) == "20.00"


def test_only_delivered_requests_are_billed() -> None:
    price = ModelPrice(10, 5, 40)
    tokens = TokenCounts(100, 20, 50)
    # Completed, or cut short after delivering output: by the client, or by
    # the server shutting down (billed for what was delivered).
    assert set(BILLABLE_STATUSES) == {"completed", "client_disconnected", "server_shutdown"}
    for status in ("completed", "client_disconnected", "server_shutdown"):
        assert is_billable(status)
        assert billed_costs(status, tokens, price).total == 80 * 10 + 20 * 5 + 50 * 40
    for status in ("error", "preempted", "aborted", "client_gone", "rate_limited"):
        assert not is_billable(status)
        assert billed_costs(status, tokens, price) is NO_COST
    assert billed_costs("completed", tokens, None) is NO_COST


def test_max_cost_bounds_every_actual_cost() -> None:
    price = ModelPrice(10, 30, 40)  # a cached price dearer than input still bounds
    bound = max_cost(100, 50, price)
    for cached in (0, 50, 100):
        for output in (0, 25, 50):
            assert line_costs(TokenCounts(100, cached, output), price).total <= bound


def test_price_file_errors_name_the_table(tmp_path: Path) -> None:
    bad = tmp_path / "prices.toml"
    bad.write_text('[prices."o3"]\ninput = "10"\n')
    with pytest.raises(PriceError, match=r"prices\.'o3'.*missing 'output'"):
        read_price_file(bad)
    bad.write_text('[prices."o3"]\ninput = "10"\noutput = "x"\n')
    with pytest.raises(PriceError, match="output price"):
        read_price_file(bad)
    bad.write_text("[tier_multipliers]\nturbo = 0.5\n")
    with pytest.raises(PriceError, match="turbo"):
        read_price_file(bad)
    bad.write_text('[flexserve]\nport = 1\n[flexserve.prices."m"]\ninput = 1\noutput = 2\n')
    prices, multipliers, windows = read_price_file(bad)
    assert windows == {}
    assert prices == [
        PriceEntry("m", ServiceTier.DEFAULT, ModelPrice(1_000_000, 1_000_000, 2_000_000))
    ]
    assert multipliers == []


def test_completion_windows_price_the_batch_tier() -> None:
    o3 = PriceEntry("o3", ServiceTier.DEFAULT, ModelPrice(10_000_000, 2_500_000, 40_000_000))
    catalog = PriceCatalog([o3])
    batch = catalog.price("o3", ServiceTier.BATCH)
    assert batch == ModelPrice(5_000_000, 1_250_000, 20_000_000)
    assert catalog.batch_price("o3", "24h") == batch
    assert catalog.batch_price("o3", "1h") == ModelPrice(7_500_000, 1_875_000, 30_000_000)
    assert catalog.batch_price("o3", "7d") == ModelPrice(4_000_000, 1_000_000, 16_000_000)
    assert catalog.batch_price("o3", "2h") is None
    assert catalog.batch_price("gpt-x", "1h") is None
    # The operator's own, kept when other entries change.
    cheaper = catalog.merged(windows={"7d": 5_000}).merged([o3])
    assert cheaper.batch_price("o3", "7d") == ModelPrice(2_500_000, 625_000, 10_000_000)
    assert cheaper.windows == {"7d": 5_000}
    with pytest.raises(PriceError, match="batch multiplier"):
        PriceCatalog([o3], windows={"24h": 5_000})
    with pytest.raises(PriceError, match="not a completion window"):
        PriceCatalog([o3], windows={"2h": 5_000})
    # A window price is rounded up to a whole micro-dollar: batch 1, × 1.5 → 2.
    odd = PriceCatalog([PriceEntry("odd", ServiceTier.DEFAULT, ModelPrice(2, 2, 2))])
    assert odd.batch_price("odd", "1h") == ModelPrice(2, 2, 2)
    assert odd.batch_price("odd", "7d") == ModelPrice(1, 1, 1)


def test_price_file_window_multipliers(tmp_path: Path) -> None:
    file = tmp_path / "prices.toml"
    file.write_text('[prices."o3"]\ninput = "10"\noutput = "40"\n[batch_windows]\n"1h" = "1.25"\n')
    prices, multipliers, windows = read_price_file(file)
    assert windows == {"1h": 12_500}
    catalog = PriceCatalog(prices, multipliers, windows)
    assert catalog.batch_price("o3", "1h") == ModelPrice(6_250_000, 6_250_000, 25_000_000)
    file.write_text('[batch_windows]\n"1h" = "lots"\n')
    with pytest.raises(PriceError, match="1h"):
        read_price_file(file)
