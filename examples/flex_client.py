"""flexserve.client in a few lines: one flex call that waits honestly and
falls back to default, then a small map with progress.

Against `make run` (the demo key is in .flexserve/demo_key):

    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=$(cat .flexserve/demo_key) \
        .venv/bin/python examples/flex_client.py
"""

from __future__ import annotations

import os

import openai

from flexserve.client import CallPolicy, flex_call_sync, map_requests_sync


def main() -> None:
    client = openai.OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                           api_key=os.environ.get("OPENAI_API_KEY", "none"))
    model = client.models.list().data[0].id

    # One request: flex, sent at default if still unanswered after 30 s.
    outcome = flex_call_sync(
        client, {"model": model, "max_tokens": 24,
                 "messages": [{"role": "user", "content": "Name three colours."}]},
        fallback_tier="default", fallback_after=30)
    if not outcome.ok:
        raise SystemExit(f"failed: {outcome.error}")
    print(f"served at {outcome.served_tier} after {outcome.seconds:.2f} s "
          f"({outcome.refusals} refusals): {outcome.body['choices'][0]['message']['content']!r}")

    # Many requests: adaptive concurrency, answers in order.
    bodies = [{"model": model, "max_tokens": 8,
               "messages": [{"role": "user", "content": f"Say {n}."}]} for n in range(10)]
    outcomes = map_requests_sync(client, bodies, policy=CallPolicy(tier="flex"),
                                 on_progress=lambda done, total: print(f"{done}/{total}", end="\r"))
    tokens = sum(o.body["usage"]["completion_tokens"] for o in outcomes if o.ok)
    print(f"{sum(o.ok for o in outcomes)} of {len(outcomes)} answered, {tokens} tokens")


if __name__ == "__main__":
    main()
