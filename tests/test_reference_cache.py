"""The content-keyed cache of the real images' features (`vq4dit.reference_cache`): an entry is computed once and
read back bit for bit, scores are the same with and without it, every part of the key recomputes when it changes,
and a corrupt, edited or misplaced entry is recomputed, never used; the digits scorer's real features and the
ImageNet scorer's reference pool. (eval.py's use of it: tests/test_eval.py.)"""

import importlib.util
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from stand_in_inception import POOL, SPATIAL, stand_in_features

import vq4dit.reference_cache as reference_cache
from vq4dit.data.digits import digits, split
from vq4dit.files import save_safetensors
from vq4dit.imagenet import ImageNetScorer
from vq4dit.imagenet.adm_npz import read_reference_batch
from vq4dit.metrics import Scorer, digits_scorer, load_classifier
from vq4dit.reference_cache import ReferenceCache, code_digest

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = ROOT / "data" / "digit_classifier.safetensors"


def scorer(folder: Path | None, **settings) -> Scorer:
    return digits_scorer(str(CLASSIFIER), cache=ReferenceCache(folder), **settings)


def sources(s: Scorer) -> list[str]:
    return [row["source"].split(" ")[0].rstrip(",") for row in s.cache.report]


def test_an_entry_is_computed_once_and_read_back_bit_for_bit(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"a": torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), "b": torch.arange(4)}

    first = ReferenceCache(tmp_path).features("thing", lambda: {"x": 1}, compute)
    again = ReferenceCache(tmp_path).features("thing", lambda: {"x": 1}, compute)  # a later run's cache
    assert len(calls) == 1 and first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) and first[k].dtype == again[k].dtype for k in first)
    assert [p.suffix for p in tmp_path.iterdir()] == [".safetensors"]  # no temporary file left
    off = ReferenceCache(None)
    off.features("thing", lambda: pytest.fail("the key is not needed without a folder"), compute)
    assert len(calls) == 2 and "reference_cache=false" in off.report[0]["source"]


def test_real_features_are_the_classifiers_own_and_scores_do_not_depend_on_the_cache(tmp_path):
    images = torch.rand(300, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(300) % 10
    uncached, cold, warm = scorer(None), scorer(tmp_path), scorer(tmp_path)
    scores = [s.score(images, labels) for s in (uncached, cold, warm)]
    assert sources(cold) == ["computed"] and sources(warm) == ["loaded"]
    assert scores[0] == scores[1] == scores[2]
    for name in ("reference", "heldout"):
        assert torch.equal(warm.real_features()[name], uncached.real_features()[name])
    # independently: the shipped classifier's penultimate features of the same real digits, in one batch
    net = load_classifier(CLASSIFIER)
    real, digit_labels = digits(16)
    ref_idx, held_idx = split(digit_labels, 0.5, seed=0)
    with torch.no_grad():
        for name, idx in (("reference", ref_idx), ("heldout", held_idx)):
            torch.testing.assert_close(warm.real_features()[name], net.features(real[idx]), rtol=1e-5, atol=1e-5)


def _other_code(monkeypatch):
    """`Scorer._embed` replaced by a function of this file: the extraction's code is other code."""
    embed = Scorer._embed

    def changed(self, images01):
        return embed(self, images01)

    monkeypatch.setattr(Scorer, "_embed", changed)


def _other_weights(s: Scorer, _monkeypatch=None):
    with torch.no_grad():
        s.features.classifier.body[0].weight[0, 0, 0, 0] += 1e-3


CHANGES = {  # what changes -> (scorer settings, a change made to the scorer or the world before scoring)
    "images (split)": ({"reference_fraction": 0.4}, None),
    "images (split seed)": ({"seed": 1}, None),
    "network weights": ({}, _other_weights),
    "batch size": ({"batch_size": 100}, None),
    "device": ({}, lambda _s, mp: mp.setattr(reference_cache, "device_kind", lambda _d: "cuda:NVIDIA H200")),
    "extraction code": ({}, lambda _s, mp: _other_code(mp)),
    "torch version": ({}, lambda _s, mp: mp.setattr(torch, "__version__", "2.0.0")),
    "cache format": ({}, lambda _s, mp: mp.setattr(ReferenceCache, "FORMAT", ReferenceCache.FORMAT + 1)),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_changing_any_part_of_the_key_recomputes(change, tmp_path, monkeypatch):
    baseline = scorer(tmp_path)
    baseline.real_features()
    settings, edit = CHANGES[change]
    changed, expected = scorer(tmp_path, **settings), scorer(None, **settings)
    if edit is not None:
        edit(changed, monkeypatch)
        edit(expected, monkeypatch)
    features = changed.real_features()
    assert sources(changed) == ["computed"] and len(list(tmp_path.glob("*.safetensors"))) == 2
    assert all(torch.equal(features[k], expected.real_features()[k]) for k in features)
    monkeypatch.undo()
    again = scorer(tmp_path)
    again.real_features()
    assert sources(again) == ["loaded"]  # the first entry is still there and still valid


def test_code_digest_follows_the_code_not_its_path(tmp_path, monkeypatch):
    def load(path: Path, source: str):
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"cache_test_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # imported as code is
        spec.loader.exec_module(module)
        return module.Net

    source = "class Net:\n    def forward(self, x):\n        return x\n"
    one, moved = load(tmp_path / "one.py", source), load(tmp_path / "moved.py", source)
    edited = load(tmp_path / "edited.py", source.replace("return x", "return 2 * x"))
    assert code_digest([one]) == code_digest([moved]) != code_digest([edited])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _edit_values_keep_header(path: Path) -> None:
    with safe_open(path, "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["reference"] = tensors["reference"] + 1.0
    save_safetensors(tensors, path, metadata=header)


CORRUPTIONS = {"a flipped byte": _flip_last_byte, "a truncated file": _truncate,
               "values edited under the same header": _edit_values_keep_header}


@pytest.mark.parametrize("corruption", [*CORRUPTIONS, "another key's entry under this name"])
def test_a_corrupt_or_misplaced_entry_is_recomputed_not_used(corruption, tmp_path, caplog):
    scorer(tmp_path).real_features()
    (entry,) = tmp_path.glob("*.safetensors")
    if corruption in CORRUPTIONS:
        CORRUPTIONS[corruption](entry)
    else:
        other = tmp_path / "other"
        scorer(other, batch_size=100).real_features()
        shutil.copyfile(next(other.glob("*.safetensors")), entry)
    with caplog.at_level(logging.WARNING, logger="vq4dit.reference_cache"):
        victim = scorer(tmp_path)
        features = victim.real_features()
    assert sources(victim) == ["computed"]
    assert any("is unusable" in r.message and str(entry) in r.message for r in caplog.records), caplog.text
    expected = scorer(None).real_features()
    assert all(torch.equal(features[k], expected[k]) for k in expected)
    again = scorer(tmp_path)
    again.real_features()
    assert sources(again) == ["loaded"]  # replaced by a valid entry


def test_imagenet_reference_pool_is_cached_by_the_files_content(tmp_path):
    """The ImageNet scorer's reference pool features (precision/recall) on a small stand-in for Inception: the
    network's own features of the file's images, the same numbers cold, warm and without the cache, found again
    under another path (the key is the file's bytes), recomputed when one pixel changes."""
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(30, 16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
    stats = {"mu": np.zeros(POOL), "sigma": np.eye(POOL), "mu_s": np.zeros(SPATIAL), "sigma_s": np.eye(SPATIAL)}
    np.savez(tmp_path / "ref.npz", arr_0=images, **stats)
    samples = torch.rand(20, 3, 16, 16, generator=g) * 2 - 1

    def run(reference: Path, folder: Path | None) -> tuple[dict, ImageNetScorer]:
        s = ImageNetScorer(stand_in_features(), read_reference_batch(reference), None, 10, 3, 8,
                           cache=ReferenceCache(folder))
        s.update(samples, torch.zeros(20, dtype=torch.long))
        return s.compute(), s

    cache = tmp_path / "cache"
    off, _ = run(tmp_path / "ref.npz", None)
    cold, first = run(tmp_path / "ref.npz", cache)
    warm, second = run(tmp_path / "ref.npz", cache)
    assert sources(first) == ["computed"] and sources(second) == ["loaded"] and off == cold == warm
    with torch.no_grad():  # independently: the network's own pool features of the file's images, in one batch
        expected = stand_in_features()(torch.from_numpy(images).permute(0, 3, 1, 2)).pool
    torch.testing.assert_close(second._reference_pool(), expected, rtol=1e-6, atol=1e-6)
    shutil.copyfile(tmp_path / "ref.npz", tmp_path / "moved.npz")
    assert sources(run(tmp_path / "moved.npz", cache)[1]) == ["loaded"]
    images[0, 0, 0, 0] ^= 1
    np.savez(tmp_path / "edited.npz", arr_0=images, **stats)
    assert sources(run(tmp_path / "edited.npz", cache)[1]) == ["computed"]
