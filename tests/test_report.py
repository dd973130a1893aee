"""The report from a small synthetic evaluation: the HTML page's structure (tables, inline plots, verdict,
gap shares), the Markdown twin, DVC plot data, and the provenance that tells two reports apart."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from report_synthetic import write_evaluation
from speckv.predictor.evaluation.provenance import collect, cpu_flags, git_state, params_hash
from speckv.predictor.evaluation.report import build_report, verdict

ROOT = Path(__file__).resolve().parents[1]


class Page(HTMLParser):
    """Sections (by id) holding tables (caption, header, rows of (text, class)), images and the verdict."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.images: list[str] = []
        self.tags: set[str] = set()
        self.verdict = ("", "")
        self._section = None
        self._cell = None
        self._in = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self._section = self.sections.setdefault(attrs["id"], {"tables": [], "text": ""})
        elif tag == "div" and attrs.get("id") == "verdict":
            self.verdict, self._in = (attrs.get("class", ""), ""), "verdict"
        elif tag == "table":
            self._section["tables"].append({"caption": "", "columns": [], "rows": []})
        elif tag == "caption":
            self._in = "caption"
        elif tag == "tr" and self._section["tables"][-1]["columns"]:
            self._section["tables"][-1]["rows"].append([])
        elif tag in ("th", "td"):
            self._cell = [tag, "", attrs.get("class", "")]
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            table = self._section["tables"][-1]
            if self._cell[0] == "th":
                table["columns"].append(self._cell[1])
            else:
                table["rows"][-1].append((self._cell[1], self._cell[2]))
            self._cell = None
        elif tag in ("caption", "div"):
            self._in = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data
        elif self._in == "verdict":
            self.verdict = (self.verdict[0], self.verdict[1] + data)
        elif self._in == "caption":
            self._section["tables"][-1]["caption"] += data
        if self._section is not None:
            self._section["text"] += data


def table(page: Page, section: str, caption: str = "") -> dict:
    found = [t for t in page.sections[section]["tables"] if t["caption"] == caption]
    assert len(found) == 1, f"{section}: tables {[t['caption'] for t in page.sections[section]['tables']]}"
    return found[0]


def row(table_: dict, name: str) -> dict[str, tuple[str, str]]:
    rows = [r for r in table_["rows"] if r[0][0] == name]
    assert len(rows) == 1, f"row {name!r} in {[r[0][0] for r in table_['rows']]}"
    return dict(zip(table_["columns"], rows[0], strict=True))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    config = write_evaluation(root, batch=True)
    metrics = build_report(config, collect(ROOT, ROOT / "params.yaml"))
    out = Path(config.out_dir)
    page = Page()
    page.feed((out / "report.html").read_text())
    return out, page, metrics


def test_page_opens_with_the_verdict_and_its_numbers(report):
    out, page, _ = report
    # live MLP / best fixed is 1.10 [1.05, 1.15] in the synthetic evaluation: the verdict is "pays", in green
    assert page.verdict[0] == "verdict up"
    assert page.verdict[1].startswith("The predictor pays") and "live wall-clock" in page.verdict[1]
    numbers = table(page, "headline", "Tokens/s ratios on test prompts")
    live, replay = "live, decode phase [95% CI]", "replay, modelled time [95% CI]"
    assert row(numbers, "MLP vs best-fixed")[live] == ("1.100× [1.050, 1.150]", "up")
    summary = json.loads((out.parent / "eval" / "summary.json").read_text())
    ci = summary["replay"]["test"]["vs_best_fixed"]["all"]["mlp"]["vs_best-fixed"]
    assert (
        row(numbers, "MLP vs best-fixed")[replay][0]
        == f"{ci['ratio']:.3f}× [{ci['low']:.3f}, {ci['high']:.3f}]"
    )
    assert row(numbers, "MLP vs fixed:4")[live] == ("1.375× [1.325, 1.425]", "up")
    assert row(numbers, "MLP vs fixed:4")[replay] == ("n/a", "")  # replay has no MLP / fixed:4 ratio
    share = "MLP share of the oracle's gain over best-fixed"
    assert row(numbers, share)[replay] == ("40% [20%, 60%]", "up")


def test_gap_share_table_has_every_policy_and_compression(report):
    _, page, _ = report
    shares = table(page, "gap-share")
    assert shares["columns"] == ["policy", "all", "fp32", "int8"]
    assert [r[0][0] for r in shares["rows"]] == ["mlp", "threshold:tuned", "first-token-oracle", "mlp+trim"]
    assert row(shares, "first-token-oracle")["int8"] == ("65% [45%, 85%]", "up")
    assert row(shares, "threshold:tuned")["all"] == ("-30% [-50%, -10%]", "down")
    assert row(shares, "mlp+trim")["fp32"] == ("5% [-15%, 25%]", "")  # spans 0: not coloured


def test_each_compression_has_its_section_with_per_task_tables(report):
    _, page, _ = report
    for compression in ("fp32", "int8"):
        section = f"compression-{compression}"
        assert "Chosen on dev: best fixed" in page.sections[section]["text"]
        per_task = table(page, section, "Share of the oracle's gain per task")
        assert per_task["columns"] == ["policy", "chat", "code"]
        replay = table(page, section, "Test replay per task, ratio to best fixed")
        assert [r[0][0] for r in replay["rows"]] == ["chat", "code"]
        live = table(page, section, "Live wall-clock runs, test prompts")
        assert [r[0][0] for r in live["rows"]] == ["none", "best-fixed", "fixed:4", "mlp"]
        assert row(live, "mlp")["decode tok/s"] == ("11.0", "")
        assert row(live, "mlp")["median TTFT s"] == ("0.500", "")
        assert table(page, section, "Live per task, tokens/s ratio to none")["rows"]


def test_best_fixed_gamma_by_compression_and_task(report):
    out, page, _ = report
    summary = json.loads((out.parent / "eval" / "summary.json").read_text())
    best = table(page, "best-fixed", page_caption(page, "best-fixed"))
    assert best["columns"][:2] == ["compression", "chosen on dev: test replay ÷ target alone"]
    assert [r[0][0] for r in best["rows"]] == ["fp32", "int8"]
    by_task = summary["replay"]["test"]["vs_none_by_task"]
    for compression in ("fp32", "int8"):
        cells = row(best, compression)
        chosen = summary["tuned"][compression]["best-fixed"]  # the page renders `spec` as code: no backticks
        assert cells["chosen on dev: test replay ÷ target alone"][0].split()[0] == chosen
        for task in ("chat", "code"):
            group = by_task[f"{compression}/{task}"]
            fixed = {r: v["tokens_per_s"] for r, v in group.items() if r == "none" or r.startswith("fixed:")}
            fastest = max(fixed, key=fixed.get)
            assert cells[f"{task}: fastest on test ÷ target alone"][0].split()[0] == fastest


def page_caption(page, section: str) -> str:
    (only,) = page.sections[section]["tables"]
    return only["caption"]


def test_page_is_self_contained_with_inline_plots(report):
    out, page, _ = report
    html = (out / "report.html").read_text()
    assert not {"script", "link", "iframe"} & page.tags
    assert "http://" not in html and "https://" not in html
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(page.images) == len(set(page.images))
    # every plot the Markdown links resolves to a file beside it, the very image the page shows inline
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (out / "report.md").read_text())
    assert linked and len(linked) == len(page.images)
    for name in linked:
        assert "data:image/png;base64," + base64.b64encode((out / name).read_bytes()).decode() in page.images


def markdown_rows(md: str) -> set[tuple[str, ...]]:
    """Every Markdown table row (header included) as its cells' text, code and bold marks dropped."""
    return {
        tuple(cell.strip().replace("`", "").replace("**", "") for cell in line.strip().strip("|").split("|"))
        for line in md.splitlines()
        if line.startswith("| ")
    }


def test_markdown_says_what_the_page_says(report):
    out, page, _ = report
    md = (out / "report.md").read_text()
    assert md.startswith("# SpecKV")
    before_sections = md.split("\n## ")[0]  # the verdict opens the report, as on the page
    assert "The predictor pays" in before_sections and "live wall-clock" in before_sections
    assert "| first-token-oracle | 65% [45%, 85%] | 65% [45%, 85%] | 65% [45%, 85%] |" in md.splitlines()
    rows = markdown_rows(md)
    for name, section in page.sections.items():
        for table_ in section["tables"]:
            assert tuple(table_["columns"]) in rows, f"{name}: header {table_['columns']}"
            for cells in table_["rows"]:
                assert tuple(text for text, _ in cells) in rows, f"{name}: row {cells}"
    assert md.count("](") == len(page.images)  # each plot linked once


def test_dvc_plot_data_and_metrics(report):
    out, _, metrics = report
    summary = json.loads((out.parent / "eval" / "summary.json").read_text())
    ratios = pd.read_csv(out / "plots" / "replay_vs_best_fixed.csv").set_index("policy")
    expected = summary["replay"]["test"]["vs_best_fixed"]["all"]["mlp"]["vs_best-fixed"]["ratio"]
    assert ratios.loc["mlp", "ratio"] == pytest.approx(expected)
    assert "best-fixed" not in ratios.index  # no ratio of the base to itself
    shares = pd.read_csv(out / "plots" / "gap_share.csv").set_index("policy")
    assert shares.loc["first-token-oracle", "share"] == pytest.approx(0.65)
    acceptance = pd.read_csv(out / "plots" / "acceptance_by_position.csv")
    assert list(acceptance.columns) == ["position", "fp32", "int8"] and list(acceptance["position"]) == [
        *range(1, 7)
    ]
    assert metrics["replay"]["oracle_gap_share"] == pytest.approx(0.40)
    assert metrics["live"]["speedup_mlp_vs_best_fixed_low"] == pytest.approx(1.05)


def test_gamma_by_batch_size_section_schedule_and_metrics(report):
    out, page, metrics = report
    section = page.sections["batch"]
    replay, live = section["tables"]
    assert "not measured on vLLM" in section["text"] and "fp32: B=1 → 3, B=2 → 2, B=4 → 0" in section["text"]
    assert [(r[0][0], r[1][0], r[2][0]) for r in replay["rows"]][:3] == [
        ("fp32", "1", "3"),
        ("fp32", "2", "2"),
    ] + [("fp32", "4", "0")]
    four = next(r for r in live["rows"] if r[0][0] == "int8" and r[1][0] == "4")
    cells = dict(zip(live["columns"], four, strict=True))
    assert cells["none tok/s"][0] == "40.0" and cells["mlp ÷ none"][0] == "0.980× (one batch)"
    assert cells["replay error, tok/s / speedup (max)"][0] == "4.0% / 5.0%" and cells["= none"][0] == "4/4"
    one = next(r for r in live["rows"] if r[0][0] == "int8" and r[1][0] == "1")
    assert dict(zip(live["columns"], one, strict=True))["mlp ÷ none"][0] == "0.980× [0.930, 1.030]"
    assert cells["under the calibration"][0] == "8.0% / 9.8%"
    assert json.loads((out / "speculation_schedule.json").read_text())["measured_with"] == "test"
    assert (out / "batch.png").is_file()
    assert metrics["batch"]["int8"]["best_gamma"] == {"1": 2, "2": 1, "4": 0}
    assert metrics["batch"]["fp32"]["live_vs_none"]["4"]["mlp"] == pytest.approx(0.98)


def test_a_report_without_batch_outputs_leaves_the_section_out(tmp_path):
    config = write_evaluation(tmp_path, live=False)
    metrics = build_report(config)
    assert "batch" not in metrics and not (Path(config.out_dir) / "speculation_schedule.json").exists()
    assert "Gamma by batch size" not in (Path(config.out_dir) / "report.md").read_text()


def test_fidelity_under_both_clocks(report):
    out, page, metrics = report
    section = page.sections["fidelity"]
    (table,) = section["tables"]
    fp32_mlp = [r for r in table["rows"] if r[0][0] == "fp32" and r[1][0] == "mlp"]
    assert len(fp32_mlp) == 1
    cells = dict(zip(table["columns"], fp32_mlp[0], strict=True))
    assert cells["calibrate stage's model: replay ÷ live, tok/s / speedup"][0] == "1.350 / 1.040"
    assert "0.78–0.82×" in section["text"]
    assert metrics["fidelity"] == {
        "max_abs_error": 0.08,
        "ratio_max_abs_error": 0.04,
        "tuning_model": {"max_abs_error": 0.35, "ratio_max_abs_error": 0.04},
    }


def test_plain_text_prompts_are_said(tmp_path):
    config = write_evaluation(tmp_path)
    provenance = {**collect(ROOT, ROOT / "params.yaml"), "chat_template": False}
    build_report(config, provenance)
    md = (Path(config.out_dir) / "report.md").read_text()
    assert "Prompts: **plain text**" in md
    assert json.loads((Path(config.out_dir) / "provenance.json").read_text())["chat_template"] is False


def test_replay_only_evaluation_decides_on_replay(tmp_path):
    config = write_evaluation(tmp_path, live=False)
    build_report(config)
    page = Page()
    page.feed((tmp_path / "report" / "report.html").read_text())
    assert "replay (modelled time)" in page.verdict[1]
    assert "live" not in page.sections and "provenance" not in page.sections
    assert not (tmp_path / "report" / "provenance.json").exists()
    numbers = table(page, "headline", "Tokens/s ratios on test prompts")
    assert row(numbers, "MLP vs best-fixed")["live, decode phase [95% CI]"] == ("n/a", "")


@pytest.mark.parametrize(
    ("low", "high", "tone", "words"),
    [(1.02, 1.2, "up", "pays"), (0.8, 0.97, "down", "does not pay"), (0.97, 1.03, "", "No evidence")],
)
def test_verdict_follows_the_interval(low, high, tone, words):
    ci = {"ratio": (low + high) / 2, "low": low, "high": high}
    replay_ci = {"ratio": 2.0, "low": 1.9, "high": 2.1}  # must be ignored: live runs decide when present
    summary = {
        "live": {"ratios": {"mlp_vs_best-fixed": ci}},
        "replay": {"test": {"vs_best_fixed": {"all": {"mlp": {"vs_best-fixed": replay_ci}}}}},
    }
    got_tone, sentence = verdict(summary)
    assert got_tone == tone and words in sentence and "live wall-clock" in sentence


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def test_git_state_sees_the_commit_and_dirty_files(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None, "changed": None}
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = git_state(tmp_path)
    assert clean == {"commit": git(tmp_path, "rev-parse", "HEAD").strip(), "dirty": False, "changed": []}
    (tmp_path / "a.txt").write_text("two\n")
    assert git_state(tmp_path)["dirty"] is True and git_state(tmp_path)["changed"] == ["a.txt"]


def test_params_hash_ignores_comments_not_values(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  seed: 0  # a comment\n  lr: 0.1\n")
    base = params_hash(path)
    path.write_text("train:\n  lr: 0.1\n  seed: 0  # another comment\n")
    assert params_hash(path) == base
    path.write_text("train:\n  lr: 0.1\n  seed: 1\n")
    assert params_hash(path) != base


def test_cpu_flags_are_read_from_cpuinfo():
    assert cpu_flags("processor: 0\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16\n") == [
        "avx2",
        "fma",
        "avx512f",
        "avx512_bf16",
    ]
    assert cpu_flags("no flags line") == []
