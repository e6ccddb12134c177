"""``flexserve sim-engine``: serve the simulated engine over HTTP."""

from __future__ import annotations

import click

from flexserve.engines.sim.profiles import COST_MODELS, PROFILES


@click.command("sim-engine")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8100, show_default=True, type=int, help="Port to listen on.")
@click.option("--profile", default="h100-llama3-8b", show_default=True,
              type=click.Choice(sorted(PROFILES)),
              help="Performance profile: step-time constants, token budget, KV cache.")
@click.option("--speed", default=1.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Run X times faster than real time (latency metrics stay in simulated seconds).")
@click.option("--max-num-seqs", default=256, show_default=True, type=click.IntRange(min=1),
              help="Most sequences in the running batch (vLLM's --max-num-seqs).")
@click.option("--kv-tokens", default=None, type=click.IntRange(min=2),
              help="KV-cache capacity in tokens; default: the profile's.")
@click.option("--scheduling-policy", default="fcfs", show_default=True,
              type=click.Choice(["fcfs", "priority"]),
              help="fcfs, or priority: the request field `priority` orders the queue, lower first.")
@click.option("--max-num-batched-tokens", default=None, type=click.IntRange(min=1),
              help="Token budget of one step, shared by decodes and prefill chunks (vLLM's "
              "--max-num-batched-tokens); default: the profile's. Smaller chunks long prompts "
              "over more steps.")
@click.option("--model-id", default=None, help="Model id to serve; default: the profile's.")
@click.option("--cost-model", type=click.Choice(COST_MODELS), default="flat",
              show_default=True, help="A step's first 128 tokens: free beyond the floor (flat), "
              "or as Vidur measured them (calibrated: H100 5.6 ms at 1 token to 6.4 at 128).")
@click.option("--long-prefill-token-threshold", default=0, show_default=True,
              type=click.IntRange(min=0), help="Most prompt tokens one sequence prefills in a "
              "step (vLLM's flag; 0: as many as the step budget leaves).")
@click.option("--enable-prefix-caching", is_flag=True,
              help="vLLM's automatic prefix caching: 16-token blocks, freed ones kept in an LRU; "
              "usage's prompt_tokens_details.cached_tokens and the prefix-cache counters.")
@click.option("--flex-prefill-budget", default=0, show_default=True,
              type=click.IntRange(min=0), help="A flex-aware step policy (needs --scheduling-policy "
              "priority): requests of priority 2 or more (FlexServe's flex and batch) prefill at "
              "most this many prompt tokens per step, only in steps where no other prompt is "
              "pending (0: off, vLLM's own behaviour).")
@click.option("--log-requests", is_flag=True,
              help="Write one JSON line per finished generation to stderr: its priority, prompt "
              "and output tokens, and its time to first token and from first to last token, "
              "in simulated seconds (the engine's own times, for benchmarks).")
@click.option("--log-steps", is_flag=True,
              help="Write one JSON line per step to stderr: when it started and how long it "
              "took, in simulated seconds, and its sequences and prompt tokens by priority.")
def sim_engine(host: str, port: int, profile: str, speed: float, max_num_seqs: int,
               kv_tokens: int | None, scheduling_policy: str, max_num_batched_tokens: int | None,
               model_id: str | None, cost_model: str, long_prefill_token_threshold: int,
               enable_prefix_caching: bool, flex_prefill_budget: int, log_requests: bool,
               log_steps: bool) -> None:
    """Serve a simulated vLLM-style engine for benchmarks, capacity planning and tests.

    An OpenAI-compatible server (GET /v1/models, POST /v1/chat/completions,
    /v1/completions and /v1/embeddings, streaming included) whose timing comes
    from a continuous-batching model calibrated on published GPU profiles, and
    whose GET /metrics carries vLLM's metric names (vllm:num_requests_waiting,
    vllm:kv_cache_usage_perc, ...). It answers as vLLM serving a text-only
    model would: n choices, tool calls, JSON and JSON-schema output, log
    probabilities, echo, token-id prompts, embedding dimensions, vLLM's
    /tokenize and /detokenize; max_tokens is cut to the room left in the
    context; image or audio input, suffix and best_of are refused with a 400
    in vLLM's error envelope. Output text is filler (JSON output validates
    against its schema); a chat prompt's token count is, per message, 4 plus
    its number of words, plus 2. Use --profile
    instant to measure a gateway's own overhead: every request is answered at
    once.
    """
    # Imported here so that `flexserve --help` does not pay for uvicorn and starlette.
    from flexserve.engines.sim.server import serve

    click.echo(
        f"sim engine {profile} at {speed}x on http://{host}:{port}/v1 "
        f"(model {model_id or PROFILES[profile].model_id})",
        err=True,
    )
    serve(host, port, profile=profile, speed=speed, max_num_seqs=max_num_seqs,
          kv_tokens=kv_tokens, scheduling_policy=scheduling_policy, model_id=model_id,
          max_num_batched_tokens=max_num_batched_tokens, cost_model=cost_model,
          long_prefill_token_threshold=long_prefill_token_threshold,
          enable_prefix_caching=enable_prefix_caching, flex_prefill_budget=flex_prefill_budget,
          log_requests=log_requests, log_steps=log_steps)
