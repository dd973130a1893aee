"""The served generator under concurrent load: the real `mlflow models serve` on localhost, a fixed number of
one-prompt requests from the test prompts at concurrency 1, 2 and 4; requests/s, p50/p95 latency and generated
tokens/s per level, every answer checked against the sequential one (concurrency 1) for the same prompt.

Without --model-uri it registers a generator in a temporary MLflow sqlite store: the embedded default pair
(fetched by `speckv models fetch`) by default, or --target/--draft/--controller (paths or names, as
`register_generator` takes them).

    python benchmarks/bench_serving.py --requests 8 --max-new-tokens 32
    python benchmarks/bench_serving.py --target models/smollm2-135m-instruct --draft none
    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python benchmarks/bench_serving.py \\
        --model-uri models:/speckv-generator@champion
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from speckv.serving_registry import register_generator
from speckv.serving_schema import GENERATOR_NAME
from speckv.serving_server import invoke, served

ROOT = Path(__file__).resolve().parents[1]


def test_prompts(path: Path, count: int, max_chars: int | None) -> list[str]:
    """`count` test-split prompts, one task after another, as the prompt stage wrote them (chat template
    applied: they are sent with chat false), cut to `max_chars` characters when given."""
    if not path.is_file():
        raise SystemExit(f"no prompt file at {path}: run `dvc repro prompts` first or give --prompt-file")
    by_task: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "test":
            by_task.setdefault(row["task"], []).append(row["text"])
    queues = [iter(texts) for _, texts in sorted(by_task.items())]
    prompts: list[str] = []
    while len(prompts) < count and queues:
        for queue in list(queues):
            text = next(queue, None)
            if text is None:
                queues.remove(queue)
            elif len(prompts) < count:
                prompts.append(text[:max_chars] if max_chars else text)
    return prompts


def register(args, store: Path) -> str:
    """A generator registered in a temporary sqlite store; its models:/ URI."""
    target, draft = args.target, None if args.draft == "none" else args.draft
    register_generator(
        controller=args.controller,
        target=target,
        draft=draft,
        device="cpu",
        gamma_max=args.gamma_max,
        max_new_tokens=args.max_new_tokens,
        max_new_tokens_cap=args.max_new_tokens,
        max_prompts=1,
        uri=f"sqlite:///{store / 'mlflow.db'}",
        artifact_location=str(store / "mlartifacts"),
    )
    return f"models:/{GENERATOR_NAME}@candidate"


def run_level(url: str, prompts: list[str], params: dict, concurrency: int) -> tuple[float, list[dict]]:
    """(wall seconds, one record per request) for `prompts` sent `concurrency` at a time."""

    def one(prompt: str) -> dict:
        start = time.perf_counter()
        status, answer = invoke(url, [prompt], params)
        if status != 200:
            raise SystemExit(f"request failed with HTTP {status}: {answer}")
        row = answer["predictions"][0]
        return {
            "latency_s": time.perf_counter() - start,
            "text": row["text"],
            "new_tokens": row["new_tokens"],
        }

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        records = list(pool.map(one, prompts))
    return time.perf_counter() - start, records


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-uri", help="a registered generator (default: register one in a temp store)")
    parser.add_argument(
        "--target", default="default", help="target to register (default: the default pair's)"
    )
    parser.add_argument("--draft", default="default", help="draft to register (none: no draft)")
    parser.add_argument(
        "--controller", default=None, help="controller spec (default: fixed:3, none without draft)"
    )
    parser.add_argument("--gamma-max", type=int, default=4)
    parser.add_argument(
        "--requests", type=int, default=8, help="requests per concurrency level (one prompt each)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt-file", type=Path, default=ROOT / "artifacts/prompts/prompts.jsonl")
    parser.add_argument("--prompt-chars", type=int, default=None, help="cut prompts to this many characters")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads of the server (OMP_NUM_THREADS)"
    )
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args()
    if args.concurrency[0] != 1:
        raise SystemExit("the first --concurrency level must be 1: its answers are the reference")
    if args.controller is None:
        args.controller = "none" if args.draft == "none" else "fixed:3"

    prompts = test_prompts(args.prompt_file, args.requests, args.prompt_chars)
    params = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0, "chat": False}
    env = {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp:
        store = Path(tmp)
        model_uri = args.model_uri
        if model_uri is None:
            model_uri = register(args, store)
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
        with served(model_uri, workers=args.workers, env=env, log_path=store / "server.log") as url:
            invoke(url, prompts[:1], {**params, "max_new_tokens": 4})  # warm-up: first-call costs
            reference: list[str] | None = None
            rows = []
            for concurrency in args.concurrency:
                wall_s, records = run_level(url, prompts, params, concurrency)
                texts = [r["text"] for r in records]
                if reference is None:
                    reference = texts
                mismatches = sum(a != b for a, b in zip(texts, reference, strict=True))
                if mismatches:
                    raise SystemExit(
                        f"concurrency {concurrency}: {mismatches} answers differ from sequential ones"
                    )
                latencies = [r["latency_s"] for r in records]
                tokens = sum(r["new_tokens"] for r in records)
                rows.append(
                    (
                        concurrency,
                        len(records) / wall_s,
                        percentile(latencies, 0.5),
                        percentile(latencies, 0.95),
                        tokens / wall_s,
                        tokens,
                    )
                )

    source = "" if args.model_uri else f" (registered here: {args.target}, {args.controller})"
    print(f"model {model_uri}{source}")
    print(
        f"CPU {cpu_name()}, {args.threads} torch threads, {args.workers} uvicorn worker(s); "
        f"{len(prompts)} requests x 1 prompt, max_new_tokens {args.max_new_tokens}, greedy"
    )
    header = [
        "concurrency",
        "requests/s",
        "p50 latency s",
        "p95 latency s",
        "tokens/s",
        "tokens",
        "= sequential",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for concurrency, rps, p50, p95, tps, tokens in rows:
        cells = [
            concurrency,
            f"{rps:.2f}",
            f"{p50:.2f}",
            f"{p95:.2f}",
            f"{tps:.1f}",
            tokens,
            f"{len(prompts)}",
        ]
        print("| " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
