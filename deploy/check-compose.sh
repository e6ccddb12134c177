#!/usr/bin/env bash
# Start the fleet of compose.yaml from scratch, check it as a client would
# (deploy/smoke.py), and take it down again with its volumes.
#
#   deploy/check-compose.sh                 # docker compose
#   COMPOSE="podman-compose" deploy/check-compose.sh

# Needs a Python with the openai SDK and httpx (make install-test's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
compose=${COMPOSE:-docker compose}
python=${PYTHON:-.venv/bin/python}
project=flexserve-check
down() { $compose -p "$project" down -v >/dev/null 2>&1 || true; }
trap down EXIT
started=$(date +%s)
$compose -p "$project" up -d --build
for port in 8001 8002 8000; do
    until curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; do
        if (( $(date +%s) - started > 900 )); then
            echo "gateway (or, on 8000, the load balancer) on port $port not healthy after 900 s" >&2
            $compose -p "$project" logs >&2
            exit 1
        fi
        sleep 2
    done
done
echo "fleet up in $(( $(date +%s) - started )) s"
key=$($compose -p "$project" exec -T gateway-1 cat /data/demo_key | tr -d '\r\n')
"$python" deploy/smoke.py --key "$key" http://127.0.0.1:8001 http://127.0.0.1:8002 http://127.0.0.1:8000
