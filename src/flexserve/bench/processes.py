"""The servers a benchmark runs, each as its own process on loopback.

Every server is started from the same Python (``flexserve`` next to
``sys.executable``), logs to a file in the run's temporary directory, and is
stopped — SIGTERM, then SIGKILL — when the ``ExitStack`` it was registered on
closes. Start-up waits for a readiness URL to answer 200; a server that dies
or hangs instead fails the run with the tail of its log.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

_READY_TIMEOUT = 90.0


class BenchError(RuntimeError):
    """A benchmark could not be set up (a server did not start, a tool is missing)."""


@dataclass(eq=False)
class Server:
    """A server process the benchmark started, and where it listens."""

    name: str
    process: subprocess.Popen[bytes]
    # Base URL, without /v1.
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after 10 s."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass

    def log_tail(self, num_lines: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-num_lines:])


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flexserve_command(*args: str) -> list[str]:
    """argv for ``flexserve ARGS…`` from this same environment."""
    script = Path(sys.executable).parent / "flexserve"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "from flexserve.cli import main; main()", *args]


def raise_nofile_limit() -> int:
    """Raise this process's open-files soft limit to its hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and Threads of a process, from /proc/PID/status (KiB)."""
    wanted = ("VmRSS", "VmHWM", "Threads")
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in wanted:
                found[key] = int(value.split()[0])
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/stat") as stat:
                # Fields after the command name, which may hold spaces: utime is 14th, stime 15th.
                fields = stat.read().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def start_server(
    stack: ExitStack,
    name: str,
    argv: Sequence[str],
    port: int,
    ready_path: str,
    log_dir: Path,
    env: Mapping[str, str | None] | None = None,
) -> Server:
    """Start ``argv``, register its stop on ``stack`` and wait until it answers.

    ``env`` adds to this process's environment; a None value removes a variable.
    """
    child_env = dict(os.environ)
    for variable, value in (env or {}).items():
        if value is None:
            child_env.pop(variable, None)
        else:
            child_env[variable] = value
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
        )
    server = Server(name, process, f"http://127.0.0.1:{port}", log_path)
    stack.callback(server.stop)
    _wait_ready(server, server.url + ready_path)
    return server


def _wait_ready(server: Server, url: str) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT
    while True:
        if server.process.poll() is not None:
            raise BenchError(
                f"{server.name} exited with status {server.process.returncode} during start-up:\n"
                + server.log_tail()
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{server.name} did not answer {url} within {_READY_TIMEOUT:.0f} s:\n"
                             + server.log_tail())
        # Polling a process we do not own the event loop of: there is no event to wait on.
        time.sleep(0.1)


def start_sim_engine(
    stack: ExitStack, log_dir: Path, *, profile: str = "instant", speed: float = 1.0,
    max_num_seqs: int = 256,
) -> Server:
    """``flexserve sim-engine`` with the given profile."""
    port = free_port()
    argv = flexserve_command(
        "sim-engine", "--port", str(port), "--profile", profile, "--speed", str(speed),
        "--max-num-seqs", str(max_num_seqs),
    )
    return start_server(stack, "sim-engine", argv, port, "/health", log_dir)


def create_key(db_url: str, home: Path, org: str = "bench",
               env: Mapping[str, str] | None = None) -> str:
    """An organization and an API key for it, made with the accounts CLI."""
    common = ["--db", db_url, "--home", str(home)]
    for args in (["orgs", "create", org, *common], ["keys", "create", "--org", org, *common]):
        done = subprocess.run(_python_flexserve(*args) if env else flexserve_command(*args),
                              capture_output=True, text=True, check=False,
                              env={**os.environ, **(env or {})})
        if done.returncode != 0:
            raise BenchError(f"flexserve {' '.join(args[:2])} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _python_flexserve(*args: str) -> list[str]:
    # Through the interpreter, so that PYTHONPATH decides which flexserve runs.
    return [sys.executable, "-c", "from flexserve.cli import main; main()", *args]


def start_gateway(
    stack: ExitStack, log_dir: Path, upstream_url: str, *, settings: Mapping[str, str] | None = None,
    name: str = "flexserve", source: Path | None = None,
) -> tuple[Server, str]:
    """``flexserve serve --engine upstream`` with its own SQLite home; returns it and a key.

    ``settings`` are extra FlexServe settings by name (``upstream_capacity``…),
    handed over as ``FLEXSERVE_<NAME>`` environment variables. ``source`` is
    another tree's ``src`` folder to run FlexServe from (a baseline to compare
    against); None: this one.
    """
    home = log_dir / f"{name}-home"
    if (home / "flexserve.db").exists():
        raise BenchError(f"{log_dir} already holds a run's gateway ({home}): give an empty or new folder")
    home.mkdir(exist_ok=True)
    db_url = f"sqlite:///{home / 'flexserve.db'}"
    path_env = {"PYTHONPATH": str(source)} if source is not None else {}
    key = create_key(db_url, home, env=path_env)
    port = free_port()
    env: dict[str, str | None] = {"FLEXSERVE_BOOTSTRAP_DEMO": "false", "FLEXSERVE_LOG_LEVEL": "warning",
                                  **path_env}
    env.update({"FLEXSERVE_" + key_.upper(): value for key_, value in (settings or {}).items()})
    args = ("serve", "--engine", "upstream", "--upstream", upstream_url, "--port", str(port),
            "--db", db_url, "--home", str(home))
    argv = _python_flexserve(*args) if source is not None else flexserve_command(*args)
    return start_server(stack, name, argv, port, "/healthz", log_dir, env), key


def start_passthrough(stack: ExitStack, log_dir: Path, upstream_url: str) -> Server:
    """The bare pass-through proxy of ``flexserve.bench.passthrough``."""
    port = free_port()
    argv = [sys.executable, "-m", "flexserve.bench.passthrough", "--upstream", upstream_url,
            "--port", str(port)]
    return start_server(stack, "passthrough", argv, port, "/health", log_dir)


def start_litellm(
    stack: ExitStack, log_dir: Path, litellm: str, upstream_url: str, model_id: str
) -> tuple[Server, str]:
    """The LiteLLM proxy (one process, no database) routing ``model_id`` to the sim
    engine; returns it and its master key (recent releases refuse to start without one)."""
    if not Path(litellm).exists():
        raise BenchError(f"--litellm {litellm}: no such file (see docs/benchmarks.md to install it)")
    config = log_dir / "litellm-config.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {model_id}\n"
        "    litellm_params:\n"
        f"      model: openai/{model_id}\n"
        f"      api_base: {upstream_url}/v1\n"
        "      api_key: sk-bench\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
        "  telemetry: false\n"
    )
    port = free_port()
    argv = [litellm, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]
    master_key = "sk-bench-" + os.urandom(16).hex()
    # No DATABASE_URL: LiteLLM then keeps no database. Quiet logs, no telemetry,
    # and the bundled model cost map (it would otherwise try to fetch one).
    env: dict[str, str | None] = {
        "DATABASE_URL": None, "LITELLM_MASTER_KEY": master_key, "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    server = start_server(stack, "litellm", argv, port, "/health/liveliness", log_dir, env)
    return server, master_key


def find_binary(name: str) -> str | None:
    """``name`` on the PATH, or in the system directories a user's PATH may
    lack (Debian puts servers such as nginx in /usr/sbin)."""
    return shutil.which(name) or next(
        (str(path) for path in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if path.exists()),
        None,
    )


def start_redis(stack: ExitStack, log_dir: Path) -> str:
    """A throwaway ``redis-server`` on a free loopback port, no persistence;
    returns its URL. For benchmarks of gateways that share state."""
    binary = find_binary("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed (Debian: apt-get install redis-server), "
                         "or give the gateways' Redis with --redis URL")
    port = free_port()
    data = log_dir / "redis-data"
    data.mkdir(exist_ok=True)
    log_path = log_dir / "redis.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", str(data)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    server = Server("redis", process, f"redis://127.0.0.1:{port}", log_path)
    stack.callback(server.stop)
    deadline = time.monotonic() + _READY_TIMEOUT
    while True:
        if process.poll() is not None:
            raise BenchError(f"redis-server exited with status {process.returncode}:\n"
                             + server.log_tail())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return server.url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError("redis-server did not answer PING in time:\n" + server.log_tail())
        time.sleep(0.05)
