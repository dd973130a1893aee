"""A served generator on localhost: `served(model_uri)` runs `mlflow models serve` on a free 127.0.0.1 port for
as long as a `with` block lasts, and `invoke(url, prompts, params)` posts one request to it (tests and
benchmarks/bench_serving.py use both).

    with served("models:/speckv-generator@candidate") as url:
        status, answer = invoke(url, ["Explain KV caches."], {"max_new_tokens": 32})
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from speckv.profiling.errors import SpeckvError
from speckv.serving_schema import PROMPT


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(
    model_uri: str,
    *,
    workers: int = 1,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    log_path: str | Path | None = None,
    start_timeout_s: float = 300.0,
) -> Iterator[str]:
    """`mlflow models serve -m model_uri --env-manager local` on 127.0.0.1 and a free port, with `workers`
    uvicorn processes; yields the base URL once /ping answers, and stops the server (its whole process group)
    when the block ends, however it ends. `env` is added to this process's environment; the server's output
    goes to `log_path` (default: discarded), whose tail is in the error when it does not start."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow execs `uvicorn` from PATH: this environment's
    full_env = {**os.environ, **(env or {}), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: uvicorn's workers stop with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _answers(url + "/ping"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(log_path).read_text(errors="replace")[-3000:] if log_path else ""
                state = f"exited with {proc.returncode}" if proc.poll() is not None else "did not answer"
                raise SpeckvError(f"mlflow models serve -m {model_uri} {state} on port {port}\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)
        if log_path:
            log.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with suppress(ProcessLookupError):  # workers left behind by a leader that died first
        os.killpg(proc.pid, signal.SIGKILL)


def invoke(
    url: str, prompts: list[str], params: dict[str, Any] | None = None, timeout_s: float = 600.0
) -> tuple[int, Any]:
    """POST prompts (and params) to a served generator's /invocations: (HTTP status, decoded JSON answer)."""
    body: dict[str, Any] = {"dataframe_split": {"columns": [PROMPT], "data": [[p] for p in prompts]}}
    if params is not None:
        body["params"] = params
    request = urllib.request.Request(
        url + "/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")
