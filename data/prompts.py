"""Prompt suites (code, math, chat, summarization), their split by prompt, and tokenized prompt files.

The split is a pure function of the prompt id, so it never moves when suites grow; `data/splits.json` pins it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speckv.profiling.atomic import write_text
from speckv.profiling.errors import SpeckvError

__all__ = [
    "SPLITS",
    "SPLITS_PATH",
    "SUMMARY_INSTRUCTION",
    "TASKS",
    "Prompt",
    "PromptsConfig",
    "assign_split",
    "build_prompt_file",
    "check_splits",
    "load_prompt_file",
    "load_prompts",
    "load_splits",
    "make_splits",
    "write_splits",
]

SUITES_DIR = Path(__file__).resolve().parent / "suites"
SPLITS_PATH = Path(__file__).resolve().parent / "splits.json"
TASKS = ("code", "math", "chat", "summarization")
# distill: the default draft learns from these; train: the acceptance predictor learns from these (a draft
# is never profiled on prompts it was distilled on: it recites them, 0.79 first-token acceptance against
# 0.23-0.25 on unseen prompts when the two overlapped); dev: selection; test: reported numbers only.
SPLITS = ("distill", "train", "dev", "test")
SUMMARY_INSTRUCTION = "Summarize the following news article in three sentences."
SPLITS_VERSION = 2
SEED_RULE = "bucket = int(sha256(prompt_id)[:8], 16) % 100; bucket < 50 -> distill, < 60 -> train, < 75 -> dev, else test"
ROW_KEYS = ("prompt_id", "task", "split", "text", "input_ids", "n_tokens", "orig_tokens", "truncated")


@dataclass
class PromptsConfig:
    """The `prompts:` section of params.yaml."""

    target: str = "default"  # model whose tokenizer (and chat template) encodes the prompts
    chat: bool = True  # wrap each prompt in the tokenizer's chat template (SmolLM2 adds its system prompt)
    max_prompt_tokens: int = 384  # longer prompts lose the end of their body (the article, for summaries)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # suites to include
    out: str = "artifacts/prompts/prompts.jsonl"  # the tokenized prompt file


@dataclass(frozen=True)
class Prompt:
    prompt_id: str  # "<task>/<source id>", stable across runs and unique across suites
    task: str
    text: str


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _head_and_body(task: str, text: str) -> tuple[str, str]:
    """A prompt's part that is never truncated and the part that may be (the article, for summaries)."""
    if task == "summarization":
        head = SUMMARY_INSTRUCTION + "\n\n"
        return head, text[len(head) :]
    return "", text


def load_prompts(suites_dir: Path = SUITES_DIR, tasks: Iterable[str] = TASKS) -> list[Prompt]:
    """All prompts of the requested tasks, in suite order."""
    tasks = list(tasks)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SpeckvError(f"unknown task(s) {unknown}; known: {list(TASKS)}")
    prompts: list[Prompt] = []
    if "code" in tasks:
        for row in _read_jsonl(suites_dir / "humaneval.jsonl"):
            number = row["task_id"].split("/")[1]
            prompts.append(Prompt(f"code/HumanEval-{number}", "code", row["prompt"]))
    if "math" in tasks:
        for i, row in enumerate(_read_jsonl(suites_dir / "gsm8k_test.jsonl")):
            prompts.append(Prompt(f"math/gsm8k-{i}", "math", row["question"]))
    if "chat" in tasks:
        for row in _read_jsonl(suites_dir / "mt_bench.jsonl"):
            prompts.append(Prompt(f"chat/mtbench-{row['question_id']}", "chat", row["turns"][0]))
    if "summarization" in tasks:
        for row in _read_jsonl(suites_dir / "summarization.jsonl"):
            text = SUMMARY_INSTRUCTION + "\n\n" + row["article"]
            prompts.append(Prompt(f"summarization/cnn-{row['id']}", "summarization", text))
    return prompts


def _order_key(prompt_id: str) -> str:
    return hashlib.sha256(prompt_id.encode("utf-8")).hexdigest()


def assign_split(prompt_id: str) -> str:
    bucket = int(_order_key(prompt_id)[:8], 16) % 100
    if bucket < 50:
        return "distill"
    if bucket < 60:
        return "train"
    return "dev" if bucket < 75 else "test"


def make_splits(prompts: Sequence[Prompt]) -> dict[str, Any]:
    ids = [p.prompt_id for p in prompts]
    if len(set(ids)) != len(ids):
        raise SpeckvError("duplicate prompt ids in the suites")
    return {
        "version": SPLITS_VERSION,
        "seed_rule": SEED_RULE,
        "splits": {pid: assign_split(pid) for pid in sorted(ids)},
    }


def write_splits(path: Path = SPLITS_PATH, prompts: Sequence[Prompt] | None = None) -> dict[str, Any]:
    splits = make_splits(load_prompts() if prompts is None else prompts)
    write_text(Path(path), json.dumps(splits, indent=1, sort_keys=True) + "\n")
    return splits


def load_splits(path: Path = SPLITS_PATH) -> dict[str, str]:
    """The committed prompt_id → split mapping."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SpeckvError(
            f"splits file not found: {path} (regenerate with data.prompts.write_splits)"
        ) from exc
    except json.JSONDecodeError as exc:
        raise SpeckvError(f"splits file {path} is not valid JSON: {exc}") from exc
    if data.get("version") != SPLITS_VERSION or not isinstance(data.get("splits"), dict):
        raise SpeckvError(f"splits file {path} is not version {SPLITS_VERSION} with a 'splits' mapping")
    return data["splits"]


def check_splits(path: Path = SPLITS_PATH, prompts: Sequence[Prompt] | None = None) -> dict[str, str]:
    """The committed splits, after checking they match the rule and cover exactly the suites' prompts."""
    committed = load_splits(path)
    expected = make_splits(load_prompts() if prompts is None else prompts)["splits"]
    if committed != expected:
        changed = sorted(k for k in set(committed) | set(expected) if committed.get(k) != expected.get(k))
        raise SpeckvError(
            f"{path} disagrees with the suites for {len(changed)} prompt(s), e.g. {changed[:3]}"
        )
    return committed


def _render(tokenizer: Any, content: str, chat: bool) -> str:
    if not chat:
        return content
    if not getattr(tokenizer, "chat_template", None):
        raise SpeckvError(
            "the target's tokenizer has no chat template: set prompts.chat: false to use the prompts as plain "
            "text (`speckv pair add --no-chat-template`)"
        )
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The chat template already carries its special tokens; plain text gets none either, so ids stay 1:1.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_prompt(tokenizer: Any, prompt: Prompt, chat: bool, max_prompt_tokens: int) -> dict[str, Any]:
    """Render and tokenize one prompt, cutting the end of its truncatable body until it fits the budget."""
    head, body = _head_and_body(prompt.task, prompt.text)
    text = _render(tokenizer, head + body, chat)
    ids = _encode(tokenizer, text)
    orig_tokens = len(ids)
    body_ids = _encode(tokenizer, body)
    keep = len(body_ids)
    # Re-tokenizing a cut text can shift a boundary token, so shrink until it really fits.
    while len(ids) > max_prompt_tokens:
        if keep == 0:
            raise SpeckvError(
                f"{prompt.prompt_id}: {len(ids)} tokens without any body exceed "
                f"max_prompt_tokens={max_prompt_tokens}"
            )
        keep = max(0, keep - (len(ids) - max_prompt_tokens))
        text = _render(tokenizer, head + tokenizer.decode(body_ids[:keep]).rstrip(), chat)
        ids = _encode(tokenizer, text)
    return {
        "prompt_id": prompt.prompt_id,
        "task": prompt.task,
        "text": text,
        "input_ids": ids,
        "n_tokens": len(ids),
        "orig_tokens": orig_tokens,
        "truncated": len(ids) < orig_tokens,
    }


def build_prompt_file(
    tokenizer: Any,
    out_path: Path,
    chat: bool,
    max_prompt_tokens: int,
    tasks: Iterable[str] = TASKS,
    suites_dir: Path = SUITES_DIR,
    splits_path: Path = SPLITS_PATH,
) -> list[dict[str, Any]]:
    """Write every prompt of `tasks` as a tokenized JSONL row (atomically) and return the rows."""
    if max_prompt_tokens < 1:
        raise SpeckvError(f"max_prompt_tokens must be positive, got {max_prompt_tokens}")
    prompts = load_prompts(suites_dir, tasks)
    splits = load_splits(splits_path)
    missing = [p.prompt_id for p in prompts if p.prompt_id not in splits]
    if missing:
        raise SpeckvError(f"{len(missing)} prompt(s) have no split in {splits_path}, e.g. {missing[:3]}")
    rows = []
    for prompt in sorted(prompts, key=lambda p: (TASKS.index(p.task), _order_key(p.prompt_id))):
        row = tokenize_prompt(tokenizer, prompt, chat, max_prompt_tokens)
        rows.append({**row, "split": splits[prompt.prompt_id]})
    write_text(Path(out_path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def load_prompt_file(
    path: Path,
    splits: Iterable[str] | None = None,
    tasks: Iterable[str] | None = None,
    per_task: int | None = None,
) -> list[dict[str, Any]]:
    """Rows of a prompt file, filtered by split and task; `per_task` keeps the first N of each task.

    "First" is the order of sha256(prompt_id), so any N is a fixed pseudo-random sample of the task.
    """
    path = Path(path)
    if not path.is_file():
        raise SpeckvError(f"prompt file not found: {path} (run `speckv prompts`)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SpeckvError(f"{path}:{lineno} is not valid JSON: {exc}") from exc
            if not isinstance(row, dict) or any(k not in row for k in ROW_KEYS):
                raise SpeckvError(f"{path}:{lineno} lacks prompt-file keys {list(ROW_KEYS)}")
            rows.append(row)
    keep_splits = set(SPLITS if splits is None else splits)
    keep_tasks = None if tasks is None else set(tasks)
    rows = [r for r in rows if r["split"] in keep_splits and (keep_tasks is None or r["task"] in keep_tasks)]
    rows.sort(key=lambda r: (r["task"], _order_key(r["prompt_id"])))
    if per_task is None:
        return rows
    counts: dict[str, int] = {}
    selected = []
    for row in rows:
        if counts.get(row["task"], 0) < per_task:
            counts[row["task"]] = counts.get(row["task"], 0) + 1
            selected.append(row)
    return selected
