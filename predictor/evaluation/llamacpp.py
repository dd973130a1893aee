"""SpecKV tunes llama.cpp: which draft-simple settings pay on this pair and machine, chosen on dev prompts
under llama.cpp's own measured costs, proven live in llama.cpp on test prompts.

Per target GGUF type: the pair converted by llama.cpp's converter; the target's greedy continuation of every
dev and test prompt in llama-server (compared with SpecKV's own traced continuation, where one exists); the
standalone draft's greedy tokens and top-10 shares along it (teacher-forced in PyTorch, as the profile stage
traces); llama.cpp's step costs fitted from timed fixed-n_max runs on dev prompts; every setting of the grid
replayed on dev, the best one recommended; then, on test prompts, the target alone, llama.cpp's defaults,
the best fixed n_max and the recommendation run interleaved in llama-server, decode tokens/s from
llama.cpp's own timings, against what the replay predicted for them.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from speckv.predictor.evaluation import llamacpp_report
from speckv.predictor.evaluation.llamacpp_replay import (
    EnginePath,
    TimedRun,
    choose,
    fit_costs,
    oracle_time,
    pooled_rate,
    replay_steps,
)
from speckv.predictor.stats import paired_ratio
from speckv.profiling import llamacpp
from speckv.profiling.atomic import atomic_path, write_text
from speckv.profiling.errors import SpeckvError
from speckv.profiling.llamacpp import DEFAULTS, Speculation

log = logging.getLogger(__name__)

SHIPPED = "shipped"  # the GGUF type of a model folder's own published GGUF
GGUF_TYPES = (*llamacpp.GGUF_TYPES, SHIPPED)


@dataclass
class LlamacppConfig:
    target_dir: str = "models/smollm2-135m-instruct"  # a save_pretrained folder llama.cpp's converter reads
    draft_dir: str = (
        "models/draft-distilled"  # a standalone causal-LM draft (llama.cpp runs no feature draft)
    )
    prompts: str = "artifacts/prompts/prompts.jsonl"
    traces_dir: str = "artifacts/profile/traces"  # SpecKV's fp32 traces, for the agreement check
    out_dir: str = "artifacts/llamacpp"
    # GGUF types of the target, each evaluated in turn: f32, f16, q8_0 (llama.cpp's converter makes them from
    # the folder) or shipped (the published GGUF the folder was dequantized from, as it is)
    target_types: list[str] = field(default_factory=lambda: ["f32", "q8_0"])
    draft_type: str = "f16"  # the draft's GGUF type, as the target's
    dev_per_task: int = 2
    test_per_task: int = 5
    n_predict: int = 64
    block_prompts: int = 4  # prompts each started llama-server runs before the next setting's takes its turn
    n_max_grid: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 8])
    n_min_grid: list[int] = field(default_factory=lambda: [0, 2])
    p_min_grid: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.7, 0.8, 0.9, 0.95])
    threads: int = 2
    ctx: int = 4096
    n_boot: int = 2000
    ci_level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [t for t in [*self.target_types, self.draft_type] if t not in GGUF_TYPES]
        if bad or not self.target_types:
            raise SpeckvError(f"GGUF types must be among {', '.join(GGUF_TYPES)}, got {bad or 'none'}")
        if min(self.n_max_grid, default=0) < 1 or min(self.n_min_grid, default=-1) < 0:
            raise SpeckvError("n_max_grid needs values >= 1 and n_min_grid values >= 0")
        if not all(0.0 <= p <= 1.0 for p in self.p_min_grid) or not self.p_min_grid:
            raise SpeckvError("p_min_grid must hold probabilities")
        if max(self.n_max_grid, default=0) < DEFAULTS.n_max:
            raise SpeckvError(
                f"n_max_grid must reach llama.cpp's default n_max {DEFAULTS.n_max}, to replay it"
            )
        if min(self.n_predict - 1, self.dev_per_task, self.test_per_task, self.block_prompts) < 1:
            raise SpeckvError("n_predict >= 2, dev_per_task, test_per_task and block_prompts >= 1 required")

    def grid(self) -> list[Speculation]:
        """The target alone, then every (n_max, n_min, p_min) with n_min <= n_max."""
        settings = [Speculation()]
        for n_max, n_min, p_min in itertools.product(self.n_max_grid, self.n_min_grid, self.p_min_grid):
            if n_min <= n_max:
                settings.append(Speculation(n_max, n_min, p_min))
        return settings

    @property
    def top(self) -> int:
        return max(self.n_max_grid)

    @property
    def bootstrap(self) -> dict[str, Any]:
        """The keyword arguments of every paired bootstrap CI the evaluation reports."""
        return {"n_boot": self.n_boot, "level": self.ci_level, "seed": self.seed}


def _load_draft(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise SpeckvError(f"no standalone draft at {path} (a save_pretrained folder): set llamacpp.draft_dir")
    draft = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return draft.requires_grad_(False)


def engine_paths(server, draft, prompts: list[dict], config: LlamacppConfig) -> list[EnginePath]:
    """The target's greedy continuation of each prompt in `server` (the target alone) and the draft along it."""
    from speckv.profiling.signals import top_k_share
    from speckv.profiling.traces import draft_path

    paths = []
    for p in prompts:
        answer = llamacpp.decode_timing(server.complete(p["input_ids"], config.n_predict))
        tokens = answer["tokens"]
        if len(tokens) < 2:
            raise SpeckvError(
                f"llama.cpp generated {len(tokens)} token(s) for {p['prompt_id']}: nothing to replay"
            )
        path = draft_path(draft, p["input_ids"], tokens, config.top, signals_of=top_k_share)
        share = [[s[0] for s in row] for row in path.signals]
        paths.append(
            EnginePath(
                p["prompt_id"],
                p["task"],
                p["split"],
                len(p["input_ids"]),
                tokens,
                path.match_len,
                share,
                config.n_predict,
            )
        )
    return paths


def agreement(paths: list[EnginePath], traces_dir: Path) -> dict[str, Any]:
    """How llama.cpp's greedy continuations compare with SpecKV's fp32 traced ones, prompt by prompt."""
    from speckv.profiling.schema import read_table

    try:
        table = read_table(traces_dir, "trace").to_pandas()
    except SpeckvError:
        return {"compared": 0, "note": f"no SpecKV traces at {traces_dir}"}
    table = table[table["compression"] == "fp32"]
    equal, prefix, compared = 0, [], 0
    for path in paths:
        rows = table[table["prompt_id"] == path.prompt_id].sort_values("new_index")
        if rows.empty:
            continue
        ours = rows["target_token"].tolist()
        n = min(len(ours), len(path.tokens))
        common = next((i for i in range(n) if ours[i] != path.tokens[i]), n)
        compared += 1
        equal += int(ours == path.tokens)
        prefix.append(common / n if n else 1.0)
    return {
        "compared": compared,
        "equal": equal,
        "mean_common_prefix": float(sum(prefix) / len(prefix)) if prefix else None,
    }


def _interleaved(
    settings: dict[str, Speculation],
    model: Path,
    draft: Path | None,
    prompts: list[dict],
    config,
    extra,
    what: str,
) -> list[dict]:
    """Every prompt under every setting, with one llama-server resident at a time: per block of
    `config.block_prompts` prompts, each setting's server is started, warmed up untimed (a fresh process pays
    one-time costs), run on the block and stopped, the settings' order rotated block by block so machine
    drift falls on all of them alike. Idle servers beside a timed one slowed it by ~10% here, so none is kept:
    calibration and live runs time under the same conditions. A progress bar `what`."""
    from tqdm import tqdm

    names, rows, size = list(settings), [], config.block_prompts
    blocks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    with tqdm(total=len(prompts) * len(names), desc=f"{what} ({len(names)} settings)", unit="run") as bar:
        for k, block in enumerate(blocks):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                args = (model, settings[name], draft, config.threads, config.ctx, extra)
                with llamacpp.Server(*args) as server:
                    server.complete(block[0]["input_ids"], 8)
                    for p in block:
                        answer = llamacpp.decode_timing(server.complete(p["input_ids"], config.n_predict))
                        rows.append(
                            {"prompt_id": p["prompt_id"], "task": p["task"], "policy": name, **answer}
                        )
                        bar.update(1)
    return rows


def calibrate(paths, prompts, target, draft_gguf, config: LlamacppConfig, gguf_type: str, extra=()):
    """llama.cpp's cost model from timed fixed-n_max runs (and the draft decoding alone) on dev prompts."""
    fixed = {"alone": Speculation(), **{f"n_max={k}": Speculation(k) for k in range(1, config.top + 1)}}
    rows = _interleaved(fixed, target, draft_gguf, prompts, config, extra, f"llama.cpp costs {gguf_type}")
    alone = {"draft": Speculation()}
    draft_rows = _interleaved(alone, draft_gguf, None, prompts, config, extra, "llama.cpp draft alone")
    by_id = {p.prompt_id: p for p in paths}
    runs, left = [], {}
    for row in rows:
        path = by_id[row["prompt_id"]]
        if row["tokens"] != path.tokens:  # left the target's own path: not replayable step by step
            left[row["policy"]] = left.get(row["policy"], 0) + 1
            continue
        runs.append(TimedRun(replay_steps(fixed[row["policy"]], path), row["decode_ms"], row["policy"]))
    if left:
        log.info("%s: runs whose output left the target-alone path, not fitted: %s", gguf_type, left)
    context = float(sum(p.n_prompt + len(p.tokens) / 2 for p in paths) / len(paths))
    per_token = [  # (ms per token, the context at mid-generation)
        (r["decode_ms"] / max(1, r["decode_tokens"]), by_id[r["prompt_id"]].n_prompt + r["decode_tokens"] / 2)
        for r in draft_rows
    ]
    draft_ms = _line(per_token, context)
    meta = {"engine": "llama.cpp", "gguf": gguf_type, "compression": gguf_type, "runs_kept": len(runs)}
    meta["runs_timed"], meta["runs_off_path"] = len(rows), left
    return fit_costs(runs, config.top, draft_ms, context, meta)


def _line(points: list[tuple[float, float]], context: float) -> tuple[float, float]:
    """(value at `context`, slope >= 0) of a least-squares line through (y, x) points."""
    import numpy as np

    y, x = np.array([p[0] for p in points]), np.array([p[1] for p in points], float)
    if len(points) < 2 or np.ptp(x) == 0:
        return float(np.median(y)), 0.0
    slope = max(0.0, float(np.polyfit(x, y, 1)[0]))
    return float(np.mean(y) + slope * (context - np.mean(x))), slope


def live_test(paths, prompts, settings: dict[str, Speculation], target, draft_gguf, config, costs, extra=()):
    """Test prompts under every setting in llama-server, interleaved; the rows, and per setting the measured
    and the replay-predicted decode tokens/s (with ratios to the target alone, paired CIs over prompts)."""
    rows = _interleaved(settings, target, draft_gguf, prompts, config, extra, "llama.cpp live")
    frame = pd.DataFrame(rows)
    frame["compression"] = "llamacpp"
    alone = {r["prompt_id"]: r["tokens"] for r in rows if r["policy"] == "alone"}
    frame["matches_alone"] = [r["tokens"] == alone.get(r["prompt_id"]) for r in rows]
    steps = costs.step_costs()
    predicted = {name: pooled_rate(setting, paths, steps) for name, setting in settings.items()}
    table = {}
    for name in settings:
        mine = frame[frame["policy"] == name]
        measured = 1e3 * mine["decode_tokens"].sum() / mine["decode_ms"].sum()
        entry = {
            "measured_tokens_per_s": float(measured),
            "replay_tokens_per_s": float(predicted[name]),
            "replay_error": float(predicted[name] / measured - 1.0),
            "matches_alone": int(mine["matches_alone"].sum()),
            "prompts": len(mine),
        }
        if name != "alone":
            entry["vs_alone"] = _ratio(frame, name, "alone", config.bootstrap)
            entry["replay_vs_alone"] = float(predicted[name] / predicted["alone"])
        table[name] = entry
    oracle_tokens = oracle_ms = 0.0
    for p in paths:
        t, m = oracle_time(p, steps)
        oracle_tokens, oracle_ms = oracle_tokens + t, oracle_ms + m
    return frame, table, 1e3 * oracle_tokens / oracle_ms


def _stamp(model_dir: Path, gguf_type: str) -> dict[str, Any]:
    """What a GGUF was made from: the folder, the type, and the size and time of each of its files."""
    files = sorted(f for f in model_dir.iterdir() if f.is_file())
    return {
        "model": str(model_dir.resolve()),
        "type": gguf_type,
        "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files},
    }


def model_gguf(model_dir: Path, out: Path, gguf_type: str) -> Path:
    """`model_dir` as the GGUF file `out` of `gguf_type`: `shipped` is the published file the folder was
    dequantized from, any other type llama.cpp's converter makes; reused while its stamp (`out` + .json)
    names the same folder, type and files."""
    from speckv.data.pairs import shipped_gguf

    stamp, stamp_path = _stamp(model_dir, gguf_type), out.with_name(out.name + ".json")
    if out.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return out
    if gguf_type == SHIPPED:
        shipped_gguf(model_dir, out)
    else:
        llamacpp.convert(model_dir, out, gguf_type)
    write_text(stamp_path, json.dumps(stamp, indent=2) + "\n")
    return out


def file_type(path: Path) -> str:
    """The GGUF's own name for its weights' type (e.g. MOSTLY_Q4_K_M)."""
    import gguf

    entry = gguf.GGUFReader(path).fields.get("general.file_type")
    if entry is None:
        return "unknown"
    value = int(entry.parts[entry.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name
    except ValueError:
        return str(value)


def run_type(config: LlamacppConfig, gguf_type: str, draft, dev: list[dict], test: list[dict]):
    """Everything for one target GGUF type: its summary section, cost model and live rows."""
    folder = Path(config.out_dir) / "gguf"
    target = model_gguf(Path(config.target_dir), folder / f"target-{gguf_type}.gguf", gguf_type)
    draft_type = config.draft_type
    draft_gguf = model_gguf(Path(config.draft_dir), folder / f"draft-{draft_type}.gguf", draft_type)
    extra = llamacpp.engine_args(target, config.threads, config.ctx)
    with llamacpp.Server(target, Speculation(), None, config.threads, config.ctx, extra) as alone:
        dev_paths = engine_paths(alone, draft, dev, config)
        test_paths = engine_paths(alone, draft, test, config)
    costs = calibrate(dev_paths, dev, target, draft_gguf, config, gguf_type, extra)
    steps = costs.step_costs()
    grid = config.grid()
    best, dev_rates = choose(grid, dev_paths, steps)
    fixed = [s for s in grid if s.n_min == 0 and s.p_min == 0.0]  # alone included
    best_fixed, _ = choose(fixed, dev_paths, steps)
    roles = {"alone": Speculation(), "defaults": DEFAULTS, "best_fixed": best_fixed, "recommended": best}
    settings = {r.name: r for r in roles.values()}  # each distinct setting runs once
    frame, table, oracle_rate = live_test(
        test_paths, test, settings, target, draft_gguf, config, costs, extra
    )
    errors = [abs(v["replay_error"]) for v in table.values()]
    ratio_errors = [
        abs(v["replay_vs_alone"] / v["vs_alone"]["ratio"] - 1.0) for v in table.values() if "vs_alone" in v
    ]
    return (
        {
            "target_gguf": target.name,
            "draft_gguf": draft_gguf.name,
            "target_file_type": file_type(target),
            "draft_file_type": file_type(draft_gguf),
            "agreement": agreement(dev_paths + test_paths, Path(config.traces_dir)),
            "dev_rates": dev_rates,
            "roles": {role: s.name for role, s in roles.items()},
            "engine_args": list(extra),
            "recommended": {**asdict(best), "args": [*extra, *best.args(draft_gguf.name)]},
            "live": table,
            "speedup_recommended_vs_alone": _ratio(frame, best.name, "alone", config.bootstrap),
            "speedup_recommended_vs_defaults": _ratio(frame, best.name, DEFAULTS.name, config.bootstrap),
            "oracle_replay_tokens_per_s": oracle_rate,
            "fidelity_max_abs_error": max(errors),
            "fidelity_ratio_max_abs_error": max(ratio_errors, default=0.0),
            "calibration_runs": costs.meta["runs_timed"],
        },
        costs,
        frame,
    )


def _ratio(frame: pd.DataFrame, a: str, b: str, boot: dict) -> dict[str, float]:
    """Decode tokens/s of setting `a` over `b` on the same prompts, paired bootstrap CI (1 when a is b)."""
    if a == b:
        return {"ratio": 1.0, "low": 1.0, "high": 1.0, "n": int((frame["policy"] == a).sum())}
    return paired_ratio(frame, a, b, time_col="decode_ms", tokens_col="decode_tokens", **boot).as_dict()


def run_llamacpp(config: LlamacppConfig) -> dict[str, Any]:
    """The whole evaluation for every target type of `config`; writes summary.json under out_dir."""
    from speckv.data.prompts import load_prompt_file
    from speckv.profiling.cpu import cpu_info

    info = llamacpp.build_info()
    llamacpp.program("llama-server")
    dev = load_prompt_file(Path(config.prompts), splits=["dev"], per_task=config.dev_per_task)
    test = load_prompt_file(Path(config.prompts), splits=["test"], per_task=config.test_per_task)
    if not dev or not test:
        raise SpeckvError(f"{config.prompts} needs dev and test prompts")
    draft = _load_draft(config.draft_dir)
    summary: dict[str, Any] = {"llamacpp": {k: info[k] for k in ("package", "version", "sha256", "build_s")}}
    summary["cpu"] = cpu_info()
    summary["config"] = asdict(config)
    out, summary["types"], results = Path(config.out_dir), {}, {}
    for gguf_type in config.target_types:
        summary["types"][gguf_type], *results[gguf_type] = run_type(config, gguf_type, draft, dev, test)
    for gguf_type, (costs, frame) in results.items():  # written once every type has run
        costs.save(out / f"costmodel_{gguf_type}.json")
        with atomic_path(out / f"live_{gguf_type}.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
    write_text(out / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    llamacpp_report.write(summary, out)
    return summary
