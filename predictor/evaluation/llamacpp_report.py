"""What a llama.cpp user takes away: the recommended flags as a ready command line, the live table that proves
them, the fidelity of SpecKV's llama.cpp replay, and a `llamacpp` metrics section."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from speckv.profiling.atomic import write_text


def command_line(section: dict[str, Any], program: str = "llama-server") -> str:
    """The `program` command that runs the recommended settings (the target alone when none pays), the
    GGUF files named as they lie in the output folder's gguf/."""
    args = [program, "-m", section["target_gguf"], *section["recommended"]["args"]]
    return shlex.join(args)


def schedule(summary: dict[str, Any]) -> dict[str, Any]:
    """speculation_schedule.json: per target GGUF type, the settings to run at batch size 1 as llama.cpp
    arguments and ready command lines, with what they were measured on and the speedups that back them."""
    build, cpu = summary["llamacpp"], summary["cpu"]
    out: dict[str, Any] = {
        "measured_with": f"llama.cpp {build['version']} (llama-server), batch size 1, "
        f"{summary['config']['threads']} threads on {cpu['model']} ({cpu['capability']})",
        "llamacpp": {},
    }
    for gguf_type, section in summary["types"].items():
        rec = section["recommended"]
        out["llamacpp"][gguf_type] = {
            "target_gguf": section["target_gguf"],
            "target_file_type": section.get("target_file_type"),
            "draft_gguf": section["draft_gguf"],
            "speculate": rec["n_max"] > 0,
            "n_max": rec["n_max"],
            "n_min": rec["n_min"],
            "p_min": rec["p_min"],
            "args": rec["args"],
            "llama_server": command_line(section),
            "llama_speculative_simple": command_line(section, "llama-speculative-simple")
            if rec["n_max"] > 0
            else None,
            "speedup_vs_alone": section["speedup_recommended_vs_alone"],
            "speedup_vs_defaults": section["speedup_recommended_vs_defaults"],
        }
    return out


def metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """Per target GGUF type: the recommended settings' speedups (with their CI ends) over the target alone and
    over llama.cpp's defaults, the replay's largest error, and the recommended arguments."""
    out = {}
    for gguf_type, section in summary["types"].items():
        entry: dict[str, Any] = {"recommended": section["roles"]["recommended"]}
        for key in ("speedup_recommended_vs_alone", "speedup_recommended_vs_defaults"):
            ci = section[key]
            entry.update({key: ci["ratio"], f"{key}_low": ci["low"], f"{key}_high": ci["high"]})
        entry["fidelity_max_abs_error"] = section["fidelity_max_abs_error"]
        entry["args"] = section["recommended"]["args"]
        out[gguf_type] = entry
    return out


def _live_rows(section: dict[str, Any]) -> list[str]:
    roles: dict[str, list[str]] = {}
    for role, name in section["roles"].items():
        roles.setdefault(name, []).append(role.replace("_", " "))
    rows = [
        "| setting | role | live tok/s | replay tok/s | replay error | live vs alone [95% CI] | replay vs alone |"
        " output = alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in section["live"].items():
        ci = entry.get("vs_alone")
        vs = f"{ci['ratio']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else "–"
        replay_vs = f"{entry['replay_vs_alone']:.3f}" if "replay_vs_alone" in entry else "–"
        rows.append(
            f"| `{name}` | {', '.join(roles.get(name, []))} | {entry['measured_tokens_per_s']:.1f} | "
            f"{entry['replay_tokens_per_s']:.1f} | {100 * entry['replay_error']:+.1f}% | {vs} | {replay_vs} | "
            f"{entry['matches_alone']}/{entry['prompts']} |"
        )
    return rows


def markdown(summary: dict[str, Any]) -> str:
    build, cpu = summary["llamacpp"], summary["cpu"]
    lines = [
        "# llama.cpp: which speculative settings pay",
        "",
        f"llama.cpp {build['version']} (`{build['package']}` sdist, sha256 {build['sha256'][:12]}…), built here in "
        f"{build['build_s'] / 60:.1f} min; CPU {cpu['model']} ({cpu['capability']}), {summary['config']['threads']} "
        "threads. Settings chosen on dev prompts under llama.cpp's costs measured here; the table is test prompts, "
        "all settings interleaved in blocks of prompts with one llama-server resident at a time, decode tokens/s "
        "from llama.cpp's own timings (after the "
        "prompt's prefill).",
    ]
    for gguf_type, section in summary["types"].items():
        agree = section["agreement"]
        rec = section["speedup_recommended_vs_alone"]
        lines += [
            "",
            f"## Target {gguf_type} (`{section['target_gguf']}`, {section.get('target_file_type', '?')}), "
            f"draft `{section['draft_gguf']}` ({section.get('draft_file_type', '?')})",
            "",
            f"Recommended: `{section['roles']['recommended']}`, {rec['ratio']:.3f}x [{rec['low']:.3f}, "
            f"{rec['high']:.3f}] the target alone. Run it with:",
            "",
            "```bash",
            command_line(section),
            "```",
            "",
            *_live_rows(section),
            "",
            f"Replay's largest error on tokens/s {100 * section['fidelity_max_abs_error']:.1f}%, on the speedup "
            f"over the target alone {100 * section['fidelity_ratio_max_abs_error']:.1f}%; the hindsight oracle "
            f"under the same costs: {section['oracle_replay_tokens_per_s']:.1f} tok/s.",
            f"llama.cpp's greedy continuations against SpecKV's fp32 traces: {agree.get('equal', 0)} of "
            f"{agree.get('compared', 0)} prompts equal"
            + (
                f", {100 * agree['mean_common_prefix']:.0f}% common prefix on average."
                if agree.get("mean_common_prefix") is not None
                else "."
            ),
        ]
    return "\n".join(lines) + "\n"


def write(summary: dict[str, Any], out_dir: Path) -> None:
    """report.md, metrics.json (the `llamacpp` section) and speculation_schedule.json under `out_dir`."""
    write_text(out_dir / "report.md", markdown(summary))
    write_text(out_dir / "metrics.json", json.dumps({"llamacpp": metrics(summary)}, indent=2) + "\n")
    write_text(out_dir / "speculation_schedule.json", json.dumps(schedule(summary), indent=2) + "\n")
