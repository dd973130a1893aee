"""The report's content as one ordered list of sections: the verdict, its key numbers, the replay and live
tables per compression, the predictor's metrics, the plots and the provenance of the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from speckv.predictor.evaluation.comparisons import LIVE_BASES
from speckv.predictor.evaluation.report_tables import (
    Cell,
    Figure,
    Section,
    Table,
    fidelity_table,
    gap_shares,
    group_table,
    live_table,
    pipe_table,
    policy_table,
    ratio_cell,
    share_cell,
    share_table,
)

# replay ratios shown per compression and task
BY_TASK_ROLES = ("mlp", "paper", "threshold:tuned", "first-token-oracle", "oracle")


def fidelity_text(fidelity: dict) -> str:
    """What the fidelity table's clock is, its largest errors, and how far the machine moved since the
    calibrate stage."""
    errors = (
        f"Largest |replay ÷ live − 1|: decode tokens/s {fidelity['max_abs_error']:.3f}, "
        f"speedup over `none` {fidelity['ratio_max_abs_error'] or 0:.3f}"
    )
    tuning = fidelity.get("tuning_model")
    if not tuning:
        return (
            f"{errors}. Every choice above is made by replay under the calibrate stage's cost model; these rows "
            "say how far its clock is from the loop's."
        )
    moved = "; ".join(
        f"{c}: a step cost {d['step_ratio_min']:.2f}–{d['step_ratio_max']:.2f}× its calibrated time"
        for c, d in fidelity["drift"].items()
    )
    return (
        f"Replay's clock here is the cost model measured again beside the live runs (the calibrate stage's "
        f"fixed-gamma runs on dev prompts, taking turns with the test prompts' live runs). {errors}. Under "
        f"the calibrate stage's model, which every choice above was tuned with: "
        f"{tuning['max_abs_error']:.3f} and {tuning['ratio_max_abs_error'] or 0:.3f} (last column); the "
        f"machine moved in between ({moved})."
    )


def verdict(summary: dict) -> tuple[str, str]:
    """(tone, sentence): the answer, from live wall-clock runs when there are any, else from replay."""
    ratios = summary.get("live", {}).get("ratios", {})
    replay_mlp = summary["replay"]["test"]["vs_best_fixed"]["all"].get("mlp", {}).get("vs_best-fixed")
    decisive = ratios.get("mlp_vs_best-fixed") or replay_mlp
    where = "live wall-clock" if "mlp_vs_best-fixed" in ratios else "replay (modelled time)"
    if decisive is None:
        return "", "No MLP results: nothing to conclude."
    if decisive["low"] > 1.0:
        return "up", f"**The predictor pays**: it beats the best fixed gamma ({where}, CI above 1)."
    if decisive["high"] < 1.0:
        return "down", (
            f"**The predictor does not pay**: it is slower than the best fixed gamma ({where}, CI below 1)."
        )
    return "", f"**No evidence that the predictor pays**: vs the best fixed gamma the CI spans 1 ({where})."


def key_numbers(summary: dict) -> Table:
    """The ratios behind the verdict: live wall-clock beside replay where both exist."""
    live = summary.get("live", {}).get("ratios", {})
    replay = summary["replay"]["test"]
    replay_vs_none = replay.get("vs_none_by_task", {}).get("all", {})
    rows = []
    for base in LIVE_BASES:
        live_ci = live.get(f"mlp_vs_{base}")
        if base == "none":
            replay_ci = replay_vs_none.get("mlp", {}).get("vs_none")
        else:
            replay_ci = replay["vs_best_fixed"]["all"].get("mlp", {}).get(f"vs_{base}")
        if live_ci or replay_ci:
            rows.append([Cell(f"MLP vs {base}"), ratio_cell(live_ci), ratio_cell(replay_ci)])
    versus = replay.get("mlp_vs", {}).get("all", {})
    rivals = [r for r in versus if r != "best-fixed"]
    if rivals:  # the strongest rival on test replay: the claim "best causal policy" is tested against it
        rival = min(rivals, key=lambda r: versus[r]["ratio"])
        rows.append(
            [Cell(f"MLP vs its strongest causal rival, {rival}"), Cell("n/a"), ratio_cell(versus[rival])]
        )
    oracle = replay["vs_best_fixed"]["all"].get("oracle", {}).get("vs_best-fixed")
    if oracle:
        rows.append([Cell("Oracle (hindsight-optimal gamma) vs best-fixed"), Cell("n/a"), ratio_cell(oracle)])
    share = gap_shares(summary).get("mlp", {}).get("all")
    if share:
        rows.append([Cell("MLP share of the oracle's gain over best-fixed"), Cell("n/a"), share_cell(share)])
    level = f"{100 * summary['config']['ci_level']:g}% CI"
    return Table(
        ["comparison", f"live, decode phase [{level}]", f"replay, modelled time [{level}]"],
        rows,
        "Tokens/s ratios on test prompts",
    )


def headline_bullets(summary: dict) -> list[str]:
    live = summary.get("live", {})
    config = summary["config"]
    best = ", ".join(f"{c}: `{t['best-fixed']}`" for c, t in summary["tuned"].items())
    lines = []
    if live.get("ratios"):
        lines.append(
            f"Live on {', '.join(config['live_controllers'])}: test prompts ({config['live_per_task']} per "
            f"task, {config['max_new_tokens']} new tokens), decode-phase wall-clock tokens/s, "
            f"{100 * config['ci_level']:g}% paired bootstrap CI over prompts; best fixed chosen on dev: {best}"
        )
        lossless = "yes" if live.get("lossless") else "**NO**"
        lines.append(f"Lossless (every greedy run of our loop token-identical to `none`): {lossless}")
        hf = "yes" if live.get("hf_matches_none") else "no"
        lines.append(f"transformers assisted generation output identical to `none`: {hf}")
    else:
        lines.append(f"No live runs in this evaluation (replay only); best fixed chosen on dev: {best}")
    no_draft = [c for c, t in summary["tuned"].items() if t["best-fixed"] == "none"]
    if no_draft:
        lines.append(
            f"On {', '.join(no_draft)} the best fixed policy is `none` (no fixed gamma beats the target alone); "
            "the MLP drafts there only when its running first-token acceptance says a draft pays, and probes "
            "once every few idle steps"
        )
    lines.append(
        f"MLP decision overhead, timed apart from decoding in a hot loop: {summary['overhead']['decision_ms']:.4f}"
        " ms per decision (inside the decode loop, its caches cold after every forward, it costs several times that)"
    )
    lines.append(f"Promotion: {summary['promotion']['reason']}")
    return lines


def compression_section(summary: dict, live: pd.DataFrame, compression: str) -> Section:
    """One compression: what dev tuning chose, test replay per task, gap shares per task, live runs."""
    section = Section(f"{compression}", anchor=f"compression-{compression}")
    tuned = summary["tuned"].get(compression)
    if tuned:
        section.blocks.append(
            f"Chosen on dev: best fixed `{tuned['best-fixed']}`, threshold `{tuned['threshold:tuned']}`, "
            f"entropy `{tuned['entropy:tuned']}`."
        )
    versus = summary["replay"]["test"].get("mlp_vs", {}).get(compression, {})
    if versus:
        section.blocks.append(
            Table(
                ["rival", "MLP ÷ rival"],
                [[Cell(rival), ratio_cell(ci)] for rival, ci in versus.items()],
                "Test replay: the MLP against every causal policy",
            )
        )
    prefix = f"{compression}/"
    by_task = summary["replay"]["test"].get("by_task", {})
    if any(g.startswith(prefix) for g in by_task):
        section.blocks.append(
            group_table(
                by_task, BY_TASK_ROLES, "best-fixed", prefix, "Test replay per task, ratio to best fixed"
            )
        )
    shares = gap_shares(summary)
    groups = sorted({g for by_group in shares.values() for g in by_group if g.startswith(prefix)})
    if groups:
        section.blocks.append(share_table(shares, groups, prefix, "Share of the oracle's gain per task"))
    if not live.empty and (live["compression"].astype(str) == compression).any():
        rows = live[live["compression"].astype(str) == compression]
        section.blocks.append(live_table(rows, "Live wall-clock runs, test prompts"))
        vs_none = summary.get("live", {}).get("vs_none_by_task", {})
        roles = [r for r in dict.fromkeys(rows["policy"]) if r != "none"]
        if any(g.startswith(prefix) for g in vs_none):
            section.blocks.append(
                group_table(vs_none, roles, "none", prefix, "Live per task, tokens/s ratio to `none`")
            )
    return section


def provenance_rows(provenance: dict, summary: dict) -> list[str]:
    """Bullets that tell two reports apart: checkout, params, machine, threads, versions."""
    git, cpu, threads = provenance["git"], provenance["cpu"], provenance["threads"]
    if git["commit"] is None:
        checkout = "not a git checkout"
    elif git["dirty"]:
        changed = git["changed"]
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        checkout = (
            f"`{git['commit'][:12]}`, **dirty**: {len(changed)} changed ({', '.join(changed[:5])}{more})"
        )
    else:
        checkout = f"`{git['commit'][:12]}`, clean"
    flags = ", ".join(cpu["flags"]) or "none detected"
    versions = ", ".join(f"{k} {v}" for k, v in provenance["versions"].items() if v)
    evaluated = summary["config"].get("threads")
    return [
        f"Commit: {checkout}",
        f"params.yaml sha256: `{provenance['params_sha256'][:16]}`",
        f"CPU: {cpu['model']} ({cpu['machine']}, {cpu['cores']} logical cores); torch capability "
        f"`{cpu['capability']}`, native bf16: {'yes' if cpu['native_bf16'] else 'no'}; flags: {flags}",
        f"GPU: {provenance['cuda'] or 'none'}",
        f"Threads: evaluate.threads {evaluated}; this process: torch {threads['torch_intra_op']} intra-op, "
        f"{threads['torch_inter_op']} inter-op, {threads['usable_cores']} usable cores, "
        + ", ".join(f"{var}={threads[var] or 'unset'}" for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")),
        f"Versions: {versions}",
        f"Platform: {provenance['platform']}",
    ] + _prompt_form(provenance)


def _prompt_form(provenance: dict) -> list[str]:
    """How the prompts reached the target: through its chat template, or as plain text (prompts.chat false:
    a base model without one)."""
    if "chat_template" not in provenance:
        return []
    if provenance["chat_template"]:
        return ["Prompts: rendered with the target's chat template"]
    return ["Prompts: **plain text** (prompts.chat is false: the target has no chat template)"]


def _is_fixed(role: str) -> bool:
    """A fixed-gamma policy: `none` (gamma 0) or `fixed:K`."""
    kind, _, value = role.partition(":")
    return role == "none" or (kind == "fixed" and value.isdigit())


def best_fixed_table(summary: dict) -> Table | None:
    """Which fixed gamma each compression wants: the one chosen on dev (what every comparison uses) with its
    test-replay ratio to the target alone, then per task the fixed gamma fastest on the test traces themselves
    (descriptive: read off the prompts it is scored on)."""
    by_task = summary["replay"]["test"].get("vs_none_by_task", {})
    tuned = summary.get("tuned", {})
    compressions = [c for c in tuned if any(g.startswith(f"{c}/") for g in by_task)]
    if not compressions:
        return None
    tasks = sorted({g.split("/", 1)[1] for g in by_task if "/" in g})

    def cell(group: str, role: str) -> Cell:
        entry = by_task.get(group, {}).get(role, {})
        ratio = ratio_cell(entry.get("vs_none")) if role != "none" else Cell("1×")
        return Cell(f"`{role}` {ratio.text}", ratio.tone)

    def fastest(group: str) -> str:
        rates = {r: v["tokens_per_s"] for r, v in by_task.get(group, {}).items() if _is_fixed(r)}
        return max(rates, key=rates.get)

    rows = []
    for c in compressions:
        chosen = tuned[c]["best-fixed"]
        none = summary["replay"]["test"]["vs_best_fixed"].get(c, {}).get("none", {}).get("vs_best-fixed")
        if none and chosen != "none":  # none ÷ best fixed, inverted
            ratio = ratio_cell({"ratio": 1 / none["ratio"], "low": 1 / none["high"], "high": 1 / none["low"]})
            dev = Cell(f"`{chosen}` {ratio.text}", ratio.tone)
        else:
            dev = Cell(f"`{chosen}`")
        rows.append([Cell(c), dev] + [cell(f"{c}/{t}", fastest(f"{c}/{t}")) for t in tasks])
    return Table(
        ["compression", "chosen on dev: test replay ÷ target alone"]
        + [f"{t}: fastest on test ÷ target alone" for t in tasks],
        rows,
        "Best fixed gamma per compression (chosen on dev prompts) and per task (the fixed gamma, or none, "
        "fastest on the test traces themselves: descriptive), tokens/s ratio to the target alone in replay",
    )


def build_sections(
    summary: dict,
    replay: pd.DataFrame,
    live: pd.DataFrame,
    figures: dict[str, Figure],
    predictor_dir: Path,
    provenance: dict | None,
) -> tuple[tuple[str, str], list[Section]]:
    """The verdict (tone, sentence) and the report's sections, in order."""
    tone, sentence = verdict(summary)
    head = Section("Headline", [key_numbers(summary), headline_bullets(summary)], "headline")
    if "goodput.png" in figures:
        head.blocks.append(figures["goodput.png"])
    sections = [head]

    shares = gap_shares(summary)
    if shares:
        groups = ["all"] + sorted({g for by in shares.values() for g in by if g != "all" and "/" not in g})
        sections.append(
            Section(
                "Share of the oracle's gain",
                [
                    "Test replay: how much of the gap between best fixed (0%) and the hindsight-optimal "
                    "oracle (100%) each policy captures; negative is slower than best fixed.",
                    share_table(shares, groups),
                ],
                "gap-share",
            )
        )

    tuned = "; ".join(
        f"{c}: best fixed `{t['best-fixed']}`, threshold `{t['threshold:tuned']}`, entropy `{t['entropy:tuned']}`"
        for c, t in summary["tuned"].items()
    )
    best_fixed = best_fixed_table(summary)
    if best_fixed is not None:
        sections.append(Section("Best fixed gamma by compression and task", [best_fixed], "best-fixed"))
    sections.append(
        Section(
            "Replay on test prompts (exact, time from the cost model)",
            [policy_table(summary), f"Tuned on dev per compression: {tuned}"],
            "replay",
        )
    )
    fidelity = summary.get("fidelity")
    if fidelity:
        level = f"{100 * summary['config']['ci_level']:g}% CI"
        sections.append(
            Section(
                "Does replay predict live decoding?",
                [fidelity_text(fidelity), fidelity_table(fidelity, level)],
                "fidelity",
            )
        )
    compressions = sorted(replay["compression"].astype(str).unique())
    sections += [compression_section(summary, live, c) for c in compressions]
    if not live.empty:
        roles = [r for r in dict.fromkeys(live["policy"]) if r != "none"]
        blocks = [
            "Decode phase: tokens after the first over the time after it (what a gamma controller "
            "controls). End to end adds both models' prefill and the first step.",
            group_table(
                summary["live"]["vs_none"],
                roles,
                "none",
                caption="Decode tokens/s ratio to `none`, all prompts and per compression",
            ),
        ]
        if "live_e2e" in summary:
            blocks.append(
                group_table(
                    summary["live_e2e"]["vs_none"],
                    roles,
                    "none",
                    caption="End-to-end tokens/s ratio to `none` (prefill and first token included)",
                )
            )
        sections.append(Section("Live wall-clock runs (test prompts)", blocks, "live"))

    predictor = Section("Predictor", anchor="predictor")
    metrics_path = predictor_dir / "metrics.json"
    if metrics_path.is_file():
        models = json.loads(metrics_path.read_text()).get("models", {})
        rows = [
            [Cell(k), Cell(f"{v['roc_auc']:.4f}"), Cell(f"{v['log_loss']:.4f}"), Cell(f"{v['brier']:.4f}")]
            for k, v in models.items()
        ]
        predictor.blocks += [
            Table(["model", "ROC AUC", "log loss", "Brier"], rows, "Test prompts"),
            "The paper's formulation (`paper_step_regression` above: a step's acceptance rate from "
            "aggregates of that step's own draft) needs inputs that exist only after the draft it would "
            "size. The `paper` policy is its closest deployable reading: the same regressor, refitted on "
            "train prompts, fed the previous step's aggregates, choosing gamma at step start.",
        ]
    importance = predictor_dir / "importance.md"
    if importance.is_file():
        table = pipe_table(importance.read_text())
        if table is not None:
            table.caption = "Feature importance beside the paper's ranking"
            predictor.blocks.append(table)
    if predictor.blocks:
        sections.append(predictor)

    plots = [f for name, f in figures.items() if name != "goodput.png"]
    sections.append(Section("Plots", plots, "plots"))
    if provenance is not None:
        sections.append(
            Section("How this report was made", [provenance_rows(provenance, summary)], "provenance")
        )
    return (tone, sentence), sections
