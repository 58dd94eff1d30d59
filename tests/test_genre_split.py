"""The genre-held-out split of the calibration text (benchmarks/alps_dense_swaps.py) and the reference instrument's
decoder-layer shim (benchmarks/reference_wanda.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from benchmarks import alps_dense_swaps as ads

L = ads.SEQLEN


def corpus() -> tuple[np.ndarray, np.ndarray]:
    """Distinct token ids (each window occurs once) in genres a [0, 2000), g [2000, 4500), h [4500, 6000)."""
    ids = np.random.default_rng(0).permutation(1_000_000)[:6000].astype(np.int64)
    genre = np.array(["a"] * 2000 + ["g"] * 2500 + ["h"] * 1500)
    return ids, genre


def test_fit_windows_avoid_the_held_genre_and_held_windows_lie_inside_it_apart_from_calibration() -> None:
    ids, genre = corpus()
    starts = [100, 700, 1900, 2100, 3000, 4600, 5200]  # 1900 straddles a and g
    calib = np.stack([ids[s : s + L] for s in starts])
    fit, held = ads.genre_split(ids, genre, calib, "g", 16)
    # brute force: the calibration windows without a token of genre g, in their order
    expected = [ids[s : s + L] for s in starts if not (genre[s : s + L] == "g").any()]
    assert np.array_equal(fit, np.stack(expected))
    used = np.zeros(ids.size, dtype=bool)
    for s in starts:
        used[s : s + L] = True
    assert len(held) >= 1
    at = [int(np.flatnonzero(ids == w[0])[0]) for w in held]
    for s, window in zip(at, held, strict=True):
        assert np.array_equal(ids[s : s + L], window)
        assert (genre[s : s + L] == "g").all() and not used[s : s + L].any()
    assert all(b >= a + L for a, b in itertools.pairwise(at))  # in order, no overlap
    # g's free stretches are 2612..3000 (too short) and 3512..4500: exactly one window fits
    assert at == [3512]
    fit2, held2 = ads.genre_split(ids, genre, calib, "g", 2)
    assert np.array_equal(fit2, fit[:2]) and np.array_equal(held2, held[:2])


def test_the_split_refuses_when_no_calibration_window_avoids_the_held_genres_or_one_is_missing() -> None:
    ids, genre = corpus()
    calib = np.stack([ids[s : s + L] for s in (100, 2100)])
    with pytest.raises(SystemExit, match="held-out genres"):
        ads.genre_split(ids, genre, calib, "ag", 4)
    stranger = calib.copy()
    stranger[1, 5] = -1
    with pytest.raises(SystemExit, match="not in the calibration text"):
        ads.genre_split(ids, genre, stranger, "g", 4)


def test_free_windows_skip_used_and_disallowed_tokens() -> None:
    ids = np.arange(4 * L, dtype=np.int64)
    used = np.zeros(ids.size, dtype=bool)
    used[L + 3] = True
    allowed = np.ones(ids.size, dtype=bool)
    allowed[3 * L + 10] = False
    got = ads.free_windows(ids, used, allowed, 8)
    # window 0 fits; the next free start is L + 4, then 2L + 4 (ends before 3L + 10); 3L + 4 would run past the end
    assert np.array_equal(got, np.stack([ids[:L], ids[L + 4 : 2 * L + 4], ids[2 * L + 4 : 3 * L + 4]]))
    allowed[2 * L + 4] = False  # the third window now starts one token later
    shifted = np.stack([ids[:L], ids[L + 4 : 2 * L + 4], ids[2 * L + 5 : 3 * L + 5]])
    assert np.array_equal(ads.free_windows(ids, used, allowed, 8), shifted)


def test_wrapped_layers_called_as_wanda_calls_them_give_the_models_logits() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from benchmarks import reference_wanda

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        originals = reference_wanda.wrap_layers(model)
        hidden = model.model.embed_tokens(ids)
        positions = torch.arange(12).unsqueeze(0)
        for layer in model.model.layers:  # wanda: layer(x, attention_mask=..., position_ids=...)[0]
            hidden = layer(hidden, attention_mask=None, position_ids=positions)[0]
        got = model.lm_head(model.model.norm(hidden))
        reference_wanda.unwrap_layers(model, originals)
        again = model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(again, expected)
    # causal: the first position's logits do not depend on later tokens
    changed = ids.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 64
    with torch.no_grad():
        other = model(input_ids=changed, use_cache=False).logits
    assert torch.allclose(other[0, :5], expected[0, :5], atol=1e-5)


def test_the_reference_instrument_refuses_bad_options_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import reference_wanda

    results = tmp_path / "results.json"
    checkout = tmp_path / "wanda"
    (checkout / "lib").mkdir(parents=True)
    (checkout / "lib" / "prune.py").write_text("")
    for args, message in (
        (["--wanda", str(tmp_path / "none")], "not a checkout of locuslab/wanda"),
        (["--wanda", str(checkout), "--runs", "sparsegpt:2"], "'sparsegpt:2'"),
        (["--wanda", str(checkout), "--runs", "dense", "wanda:4:2"], "'wanda:4:2'"),
        (["--wanda", str(checkout), "--runs", "sgd:0.5"], "'sgd:0.5'"),
    ):
        assert reference_wanda.main([*args, "--results", str(results)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert not results.exists()


def test_fit_gram_damps_each_input_by_its_own_energy() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)) * np.array([1.0, 10.0, 0.1, 1.0, 3.0, 0.5])
    gram = x.T @ x
    np.testing.assert_array_equal(ads.fit_gram(gram, "percdamp", 0.3), gram)
    damped = ads.fit_gram(gram, "diag", 0.3)
    np.testing.assert_allclose(np.diag(damped), 1.3 * np.diag(gram))
    off = ~np.eye(6, dtype=bool)
    np.testing.assert_array_equal(damped[off], gram[off])


def test_rho_schedule_sets_and_restores_the_solvers_constants() -> None:
    from graphprune.algorithms import alps

    before = alps.RHO_START, alps.GROWTH
    with ads.rho_schedule("0.03/1.5,1.25,1.05"):
        assert (alps.RHO_START, alps.GROWTH) == (0.03, (1.5, 1.25, 1.05))
    assert before == (alps.RHO_START, alps.GROWTH)
    with pytest.raises(RuntimeError), ads.rho_schedule("0.3"):
        assert (0.3, before[1]) == (alps.RHO_START, alps.GROWTH)
        raise RuntimeError
    assert before == (alps.RHO_START, alps.GROWTH)


def test_calibration_order_permutes_the_same_windows_and_none_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    windows = np.arange(12 * 4, dtype=np.int64).reshape(12, 4)
    np.savez(tmp_path / "smollm2_brown_calib.npz", input_ids=windows, attention_mask=np.ones_like(windows))
    monkeypatch.setattr(ads, "REFERENCE", tmp_path)
    assert np.array_equal(ads.calibration_windows(), windows)
    first, again, other = (ads.calibration_windows(seed) for seed in (1, 1, 2))
    assert np.array_equal(first, again)  # one seed, one order
    assert not np.array_equal(first, windows) and not np.array_equal(first, other)
    # every window kept whole and exactly once
    assert sorted(map(tuple, first)) == sorted(map(tuple, windows))
