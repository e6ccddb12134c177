"""Check a running fleet (compose.yaml) as a client would: every gateway
answers a default and a flex request through the official SDK, and the
usage one gateway reports counts the requests served by all of them, once.

    python deploy/smoke.py --key "$KEY" http://127.0.0.1:8001 http://127.0.0.1:8002

Exits non-zero, saying what was wrong, if anything was.
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx
import openai


def requests_counted(base_url: str, key: str) -> int:
    """Requests in the organization's usage today, as ``base_url`` reports it."""
    since = int(time.time()) - 86_400
    reply = httpx.get(f"{base_url}/v1/organization/usage/completions",
                      params={"start_time": since, "bucket_width": "1d"},
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)
    reply.raise_for_status()
    return sum(r["num_model_requests"] for bucket in reply.json()["data"] for r in bucket["results"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", required=True, help="An admin API key of an organization.")
    parser.add_argument("gateways", nargs="+", help="Each gateway's base URL.")
    args = parser.parse_args()
    before = requests_counted(args.gateways[0], args.key)
    for url in args.gateways:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=args.key, max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        for tier in ("default", "flex"):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hello."}],
                max_tokens=8, service_tier=tier,
            )
            if reply.service_tier != tier or reply.usage is None or not reply.choices[0].message.content:
                print(f"{url}: a {tier} request came back as {reply.model_dump_json()}", file=sys.stderr)
                return 1
            print(f"{url}: {tier} served by {model}, {reply.usage.completion_tokens} tokens")
    expected = before + 2 * len(args.gateways)
    deadline = time.monotonic() + 30
    while (counted := requests_counted(args.gateways[-1], args.key)) < expected \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    if counted == expected:
        time.sleep(2)  # anything billed twice would be in by now
        counted = requests_counted(args.gateways[-1], args.key)
    if counted != expected:
        print(f"usage counts {counted - before} new requests, not {expected - before}", file=sys.stderr)
        return 1
    print(f"usage on {args.gateways[-1]}: {counted - before} new requests, from every gateway")
    return 0


if __name__ == "__main__":
    sys.exit(main())
