"""``flexserve run``: a bulk job against any OpenAI-compatible endpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

import click

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str, option: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1.5d``: seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise click.BadParameter(f"expected a duration such as 90s, 30m or 2h, not {text!r}",
                                 param_hint=option)
    return float(match.group(1)) * _SECONDS[match.group(2)]


@click.command("run")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False,
                                                                path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output file (OpenAI batch output lines); run again with it to resume. "
              "Failed lines go to OUTPUT.errors.jsonl beside it.")
@click.option("--base-url", envvar="OPENAI_BASE_URL", default="http://127.0.0.1:8000/v1",
              show_default=True, help="The endpoint's base URL, ending in /v1 [env OPENAI_BASE_URL].")
@click.option("--api-key", envvar="OPENAI_API_KEY", default="", help="API key [env OPENAI_API_KEY].")
@click.option("--model", help="Model for plain prompts (batch input lines name their own).")
@click.option("--template", default="{prompt}", show_default=True,
              help="Plain prompts: the user message, with {prompt} and any CSV/JSONL column.")
@click.option("--column", default="prompt", show_default=True,
              help="CSV or JSONL prompts: the column holding the prompt.")
@click.option("--system", help="Plain prompts: a system message before each.")
@click.option("--max-tokens", type=int, help="Plain prompts: max_tokens of each request.")
@click.option("--tier", type=click.Choice(["flex", "default", "priority", "auto", "none"]),
              default="flex", show_default=True,
              help="service_tier sent with every request (none: the line's own).")
@click.option("--concurrency", type=int, help="Requests in flight, fixed [adaptive: AIMD on "
              "429s and latency, guided by /v1/flex/status where the server has it].")
@click.option("--max-concurrency", type=int, default=256, show_default=True,
              help="Adaptive concurrency never passes this.")
@click.option("--deadline", help="Time for the whole job (e.g. 2h); lines not sent by then "
              "are left for a rerun.")
@click.option("--fallback-tier", type=click.Choice(["default", "priority", "auto"]),
              help="A request still unanswered after --fallback-after is sent at this tier.")
@click.option("--fallback-after", help="Per request, e.g. 30m (with --fallback-tier).")
@click.option("--price", help="Default tier's price, INPUT/OUTPUT dollars per 1M tokens "
              "(e.g. 10/40): counts cost and savings [the endpoint's, where it publishes them].")
@click.option("--flex-price", help="Flex price, INPUT/OUTPUT per 1M tokens [half of --price].")
@click.option("--priority-price", help="Priority price, INPUT/OUTPUT per 1M tokens [--price].")
@click.option("--max-cost", help="Dollars: no request starts whose worst case could pass it "
              "(needs prices: the endpoint's, or --price).")
@click.option("--retry-errors", is_flag=True, help="Send again the lines in the error file.")
@click.option("--via", type=click.Choice(["direct", "batch"]), default="direct", show_default=True,
              help="direct: requests one by one; batch: the server's Batch API.")
@click.option("--quiet", "-q", is_flag=True, help="No live progress; the summary only.")
def run(input_path: Path, output: Path, base_url: str, api_key: str, model: str | None,
        template: str, column: str, system: str | None, max_tokens: int | None, tier: str,
        concurrency: int | None, max_concurrency: int, deadline: str | None,
        fallback_tier: str | None, fallback_after: str | None, price: str | None,
        flex_price: str | None, priority_price: str | None, max_cost: str | None,
        retry_errors: bool, via: str, quiet: bool) -> None:
    """Run a file of requests (OpenAI batch input, or prompts) with progress,
    resume, honest waiting on 429s and cost, writing OpenAI batch output.

    INPUT is JSONL batch input (custom_id, method, url, body), or prompts: a
    text file (one per line), a CSV or JSONL file (--column) made into chat
    completions for --model through --template. Retries follow Retry-After
    and x-should-retry; other 4xx are final and go to the error file.
    """
    import openai

    from flexserve.client.calls import CallPolicy
    from flexserve.client.costs import Prices, published_prices
    from flexserve.client.jobs import JobError, PromptFormat, read_lines
    from flexserve.client.progress import Reporter
    from flexserve.client.runner import Progress, RunOptions, run_job

    if concurrency is not None and concurrency < 1:
        raise click.BadParameter("must be at least 1", param_hint="--concurrency")
    if (fallback_tier is None) != (fallback_after is None):
        raise click.UsageError("--fallback-tier and --fallback-after go together")
    try:
        prices = Prices.parse(price, flex_price, priority_price)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    limit = None
    if max_cost is not None:
        try:
            limit = Decimal(max_cost.lstrip("$"))
        except InvalidOperation as exc:
            raise click.BadParameter(f"expected dollars, not {max_cost!r}",
                                     param_hint="--max-cost") from exc
    try:
        lines = read_lines(input_path, PromptFormat(model, template, column, max_tokens, system))
    except JobError as exc:
        raise click.UsageError(str(exc)) from exc
    policy = CallPolicy(
        tier=None if tier == "none" else tier, fallback_tier=fallback_tier,
        fallback_after=None if fallback_after is None else parse_duration(fallback_after,
                                                                          "--fallback-after"))
    options = RunOptions(
        policy=policy, concurrency=concurrency, max_concurrency=max_concurrency,
        deadline=None if deadline is None else parse_duration(deadline, "--deadline"),
        prices=prices, max_cost=limit, retry_errors=retry_errors)
    reporter = Reporter(quiet=quiet)

    async def go() -> Progress:
        async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none") as client:
            job = options
            models = {str(line.body.get("model")) for line in lines}
            if not prices.known and len(models) == 1:
                job = dataclasses.replace(options, prices=await published_prices(client, *models))
            if limit is not None and not job.prices.known:
                raise click.UsageError("--max-cost needs prices: the endpoint publishes none for "
                                       f"{', '.join(sorted(models))}; give --price")
            if via == "batch":
                from flexserve.client.via_batch import run_batch_job

                return await run_batch_job(client, lines, output, job, reporter)
            return await run_job(client, lines, output, job, reporter)

    try:
        progress = asyncio.run(go())
    except JobError as exc:  # the server refused the job (a batch that failed validation)
        raise click.ClickException(str(exc)) from exc
    if progress.failed or progress.remaining:
        raise SystemExit(1)
