"""nginx from the installed binaries (Debian: apt-get install nginx-light),
running deploy/nginx-flexserve.conf — the file compose.yaml mounts — with
its gateways' and its own addresses replaced by the test's."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from conftest import free_port, stop_process, wait_healthy
from installed import find_binary, unavailable

SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "nginx-flexserve.conf"
HOW_TO_ENABLE = (
    "nginx is not installed: the test of gateways behind a load balancer did not run. "
    "Install it (Debian: apt-get install nginx-light; .ci/run does) to run it."
)


def nginx_or_skip() -> str:
    """The installed ``nginx``; skipped where there is none (failed where the
    run requires it: FLEXSERVE_TEST_NGINX=required, as .ci/run sets)."""
    return find_binary("nginx") or unavailable("NGINX", HOW_TO_ENABLE)


def site_config(gateways: Sequence[str], port: int) -> str:
    """The shipped site with ``gateways`` (host:port) in place of compose's
    and listening on ``port`` of loopback."""
    text = SHIPPED.read_text()
    servers = re.findall(r"^\s*server (gateway-\d+:8000)", text, re.M)
    assert len(servers) == len(gateways), f"the shipped file names {servers}"
    for name, address in zip(servers, gateways, strict=True):
        text = text.replace(f"server {name}", f"server {address}")
    assert "listen 8000;" in text
    return text.replace("listen 8000;", f"listen 127.0.0.1:{port};")


@contextmanager
def nginx_in_front(gateways: Sequence[str], workdir: Path) -> Iterator[str]:
    """nginx in front of ``gateways`` (host:port each); yields its URL."""
    binary = nginx_or_skip()
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "flexserve.conf").write_text(site_config(gateways, port))
    temp = "\n".join(f"  {kind}_temp_path {workdir / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = workdir / "nginx.conf"
    main.write_text(
        f"worker_processes 1;\nerror_log {workdir / 'error.log'} info;\npid {workdir / 'nginx.pid'};\n"
        f"events {{}}\nhttp {{\n  access_log {workdir / 'access.log'};\n{temp}\n"
        f"  include {workdir / 'flexserve.conf'};\n}}\n")
    process = subprocess.Popen([binary, "-p", str(workdir), "-c", str(main), "-g", "daemon off;"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url, 30, lambda: _stderr(process) or "nginx did not pass /healthz on in 30 s")
        yield url
    finally:
        stop_process(process, 10)


def _stderr(process: subprocess.Popen[bytes]) -> str:
    """What nginx said, once it has exited (read before, the pipe would block)."""
    if process.poll() is None or process.stderr is None:
        return ""
    return process.stderr.read().decode()
