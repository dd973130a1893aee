"""Is the feature draft bound by its teacher data? Trains it, side by side in one run, on variants of the
distill stage's cached teacher data with the stage's recipe and step count, and prints held-out (dev)
first-token agreement next to agreement on its own greedy training sequences.

    dvc repro distill                        # the teacher caches: artifacts/distill/teacher{,-dev}.pt
    python benchmarks/bench_draft_data.py    # --arms full,half,references --steps N

Arms (each trains a fresh draft from the same initialisation and seed):
- `full`: the cache as the stage uses it.
- `half`: the sequences of half the cached prompts per task (a seeded choice; a prompt's sampled repeats
  go with it): what the draft loses with half the data.
- `references`: the cache plus teacher-forced *reference answers* of every distill prompt that has one
  (GSM8K solutions without their calculator annotations, HumanEval canonical solutions, CNN/DailyMail
  highlights; MT-Bench has none), capped at the stage's `max_new_tokens`. The target reads prompt + answer
  in one forward, whose final hidden states give the loss its labels (the target's own distribution at every
  answer position) and the draft its input features: data at prefill speed rather than decode speed, but off
  the target's own path. Its seconds are printed.

Descriptive, on dev prompts (the pipeline's model cards report test agreement); the step count is the stage's
(`feature_steps`, after `no_bf16` on a CPU without native bf16) unless `--steps` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

import torch
from speckv.data.distill import DistillConfig, resolve_config, set_seed
from speckv.data.draft_training import pick_vocab
from speckv.data.feature_draft_training import (
    build_feature_draft,
    feature_agreement_by_task,
    train_feature_draft,
)
from speckv.data.prompts import SUITES_DIR, load_prompt_file
from speckv.pipeline.config import load_section
from speckv.pipeline.models import TEACHER_FILE
from speckv.profiling.atomic import write_text
from speckv.profiling.cpu import cpu_info
from speckv.profiling.errors import SpeckvError

ARMS = ("full", "half", "references")

log = logging.getLogger(__name__)


def references(suites_dir: Path = SUITES_DIR) -> dict[str, str]:
    """Reference answers by prompt id (the ids `speckv.data.prompts.load_prompts` gives)."""

    def rows(name: str) -> list[dict]:
        with (suites_dir / name).open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    refs = {}
    for i, r in enumerate(rows("gsm8k_test.jsonl")):
        refs[f"math/gsm8k-{i}"] = re.sub(r"<<[^>]*>>", "", r["answer"])
    for r in rows("humaneval.jsonl"):
        refs[f"code/HumanEval-{r['task_id'].split('/')[1]}"] = r["canonical_solution"]
    for r in rows("summarization.jsonl"):
        refs[f"summarization/cnn-{r['id']}"] = r["reference"]
    return refs


@torch.inference_mode()
def teacher_forced(target, tokenizer, rows: list[dict], cap: int, chunk_tokens: int = 4096) -> list[dict]:
    """Teacher sequences (the cache's format) of prompt + reference answer + EOS, one forward per chunk of
    similar lengths, right padded (a causal model's real positions never see the padding)."""
    eos = tokenizer.eos_token_id
    seqs = []
    for r in rows:
        answer = tokenizer(r["reference"], add_special_tokens=False)["input_ids"][: cap - 1] + [eos]
        seqs.append((r, r["input_ids"] + answer))
    seqs.sort(key=lambda x: len(x[1]))
    out, i = [], 0
    while i < len(seqs):
        j = i + 1
        while j < len(seqs) and (j - i + 1) * len(seqs[j][1]) <= chunk_tokens:
            j += 1
        chunk = seqs[i:j]
        width = max(len(s) for _, s in chunk)
        ids = torch.full((len(chunk), width), eos, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for k, (_, s) in enumerate(chunk):
            ids[k, : len(s)] = torch.tensor(s)
            mask[k, : len(s)] = 1
        hidden = target.model(input_ids=ids, attention_mask=mask).last_hidden_state
        for k, (r, s) in enumerate(chunk):
            out.append(
                {
                    "tokens": torch.tensor(s, dtype=torch.int32),
                    "hidden": hidden[k, : len(s) - 1].to(torch.float16),
                    "n_prompt": len(r["input_ids"]),
                    "prompt_id": r["prompt_id"],
                    "task": r["task"],
                    # Counted like a sampled repeat: its prompt positions carry no head loss (the greedy
                    # sibling's, where there is one, already do), its answer positions do.
                    "sample": 1,
                }
            )
        i = j
        log.info("reference answers: %d/%d sequences read", len(out), len(seqs))
    return out


def half_of(seqs: list[dict], seed: int) -> list[dict]:
    """The sequences of half the prompts of each task (seeded), each with its sampled repeats."""
    by_task: dict[str, list[str]] = {}
    for s in seqs:
        if s["prompt_id"] not in by_task.setdefault(s["task"], []):
            by_task[s["task"]].append(s["prompt_id"])
    g = torch.Generator().manual_seed(seed)
    keep = set()
    for ids in by_task.values():
        keep.update(ids[i] for i in torch.randperm(len(ids), generator=g)[: len(ids) // 2].tolist())
    return [s for s in seqs if s["prompt_id"] in keep]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the stage's)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prompts", default="artifacts/prompts/prompts.jsonl")
    parser.add_argument("--target", default="models/smollm2-135m-instruct")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    arms = [a for a in args.arms.split(",") if a]
    bad = sorted(set(arms) - set(ARMS))
    if bad or not arms:
        raise SystemExit(f"error: unknown arms {bad}; choose from {', '.join(ARMS)}")
    teacher = TEACHER_FILE
    dev_path = teacher.with_name(f"{teacher.stem}-dev{teacher.suffix}")  # the distill stage's naming
    for path in (teacher, dev_path, Path(args.prompts), Path(args.target)):
        if not path.exists():
            raise SystemExit(f"error: {path} not found (run `dvc repro distill` first)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        config = resolve_config(load_section(DistillConfig, "distill", args.params))
    except SpeckvError as exc:
        raise SystemExit(f"error: {exc}") from None
    steps = config.feature_steps if args.steps is None else args.steps
    if steps < 1:
        raise SystemExit("error: --steps must be positive")
    torch.set_num_threads(config.threads)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    train = list(torch.load(teacher)["seqs"].values())
    dev = list(torch.load(dev_path)["seqs"].values())
    cpu = cpu_info()
    print(f"CPU {cpu['model']} ({cpu['capability']}), {config.threads} threads; {steps} steps")
    # One restricted vocabulary for every arm (the stage's, from the whole cache), so the arms differ in data only.
    vocab = pick_vocab(train, config.restricted_vocab, target.config.vocab_size)
    results = []
    for arm in arms:
        extra_s = 0.0
        seqs = train
        if arm == "half":
            seqs = half_of(train, config.seed)
        elif arm == "references":
            refs = references()
            rows = [
                {**r, "reference": refs[r["prompt_id"]]}
                for r in load_prompt_file(Path(args.prompts), splits=["distill"])
                if r["prompt_id"] in refs
            ]
            if not rows:
                raise SystemExit(f"error: {args.prompts} has no distill prompt with a reference answer")
            t0 = time.perf_counter()
            seqs = train + teacher_forced(target, tokenizer, rows, config.max_new_tokens)
            extra_s = time.perf_counter() - t0
        set_seed(config.seed)
        draft = build_feature_draft(target, vocab, config.feature_init_layer)
        stats = train_feature_draft(draft, seqs, config, steps, config.feature_noise)
        exact = draft.float()
        held_out = feature_agreement_by_task(exact, dev)
        own = feature_agreement_by_task(exact, [s for s in seqs if s.get("sample", 0) == 0])
        row = {
            "arm": arm,
            "sequences": len(seqs),
            "answer_tokens": sum(len(s["tokens"]) - s["n_prompt"] for s in seqs),
            "all_tokens": sum(len(s["tokens"]) for s in seqs),
            "data_s": round(extra_s, 1),
            "train_s": round(stats["train_s"], 1),
            "dev": round(held_out["overall"], 4),
            "dev_per_task": {t: round(a, 4) for t, a in held_out["per_task"].items()},
            "train_greedy": round(own["overall"], 4),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| arm | sequences | answer tokens | extra data s | train s | dev agreement | own greedy train seqs |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['arm']} | {r['sequences']} | {r['answer_tokens']:,} | {r['data_s']:.0f} | {r['train_s']:.0f} "
            f"| {r['dev']:.3f} | {r['train_greedy']:.3f} |"
        )
    if args.out:
        write_text(args.out, json.dumps({"steps": steps, "cpu": cpu, "arms": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
