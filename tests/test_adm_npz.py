"""The ADM evaluator's .npz files: samples written batch by batch read back with numpy (and numpy's own files with
our batch reader), and a reference batch is checked for what the protocol needs before any sampling."""

import numpy as np
import pytest

from vq4dit.errors import UserError
from vq4dit.imagenet.adm_npz import AdmSampleWriter, open_npz_array, read_reference_batch


def _images(n: int, h: int = 6, w: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _one_line_naming(err: pytest.ExceptionInfo, *parts) -> str:
    msg = str(err.value)
    assert "\n" not in msg and all(str(p) in msg for p in parts), msg
    return msg


def test_written_samples_load_with_numpy_as_the_adm_evaluator_reads_them(tmp_path):
    images, labels = _images(11), np.arange(11) % 4
    path = tmp_path / "samples.npz"
    with AdmSampleWriter(path, labels, (6, 5, 3)) as writer:
        for part in (images[:4], images[4:5], images[5:]):  # uneven batches
            writer.write(part)
    with np.load(path) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (11, 6, 5, 3)
        assert np.array_equal(npz["arr_0"], images) and np.array_equal(npz["arr_1"], labels)
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]  # the temporary name is gone


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_reader_streams_numpy_files_in_batches(tmp_path, save):
    images = _images(13, seed=1)
    save(tmp_path / "ref.npz", arr_0=images, mu=np.zeros(3))
    with open_npz_array(tmp_path / "ref.npz") as reader:
        assert reader.shape == (13, 6, 5, 3) and len(reader) == 13
        batches = list(reader.batches(5))
    assert [len(b) for b in batches] == [5, 5, 3]
    assert np.array_equal(np.concatenate(batches), images)


def test_writer_refuses_wrong_images_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "samples.npz"
    writer = AdmSampleWriter(path, np.zeros(4, dtype=int), (6, 5, 3))
    with pytest.raises(ValueError, match="uint8"):
        writer.write(_images(2).astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        writer.write(_images(2, h=5))
    writer.write(_images(3))
    with pytest.raises(ValueError, match="more than the 4"):
        writer.write(_images(2))
    with pytest.raises(ValueError, match="3 of 4"):
        writer.close()
    writer.abort()
    with pytest.raises(RuntimeError), AdmSampleWriter(path, np.zeros(4, dtype=int), (6, 5, 3)) as w:
        w.write(_images(4))
        raise RuntimeError("sampling crashed")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def reference(tmp_path):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(3, 3))
    stats = {"mu": rng.normal(size=4), "sigma": a @ a.T, "mu_s": rng.normal(size=3), "sigma_s": b @ b.T}
    return tmp_path, _images(7, seed=3), stats


def test_reference_batch_statistics_and_images(reference):
    tmp_path, images, stats = reference
    np.savez(tmp_path / "ref.npz", arr_0=images, **{k: v.astype(np.float32) for k, v in stats.items()})
    batch = read_reference_batch(tmp_path / "ref.npz")
    assert batch.images_shape == (7, 6, 5, 3)
    for key, value in stats.items():
        assert getattr(batch, key).dtype == np.float64
        np.testing.assert_array_equal(getattr(batch, key), value.astype(np.float32))
    with batch.images() as reader:
        assert np.array_equal(np.concatenate(list(reader.batches(3))), images)


@pytest.mark.parametrize("drop", ["mu", "sigma_s"])
def test_reference_without_statistics_is_refused(reference, drop):
    tmp_path, images, stats = reference
    del stats[drop]
    path = tmp_path / "no_stats.npz"
    np.savez(path, arr_0=images, **stats)
    with pytest.raises(UserError) as err:
        read_reference_batch(path)
    _one_line_naming(err, path, drop, "arr_0")  # names what is missing and what the file holds


def test_reference_with_bad_contents_is_refused(reference):
    tmp_path, images, stats = reference
    cases = {
        "missing.npz": None,
        "float_images.npz": dict(arr_0=images.astype(np.float32), **stats),
        "gray_images.npz": dict(arr_0=images[..., :1], **stats),
        "no_images.npz": dict(stats),
        "bad_sigma.npz": dict(arr_0=images, **{**stats, "sigma": stats["sigma"][:3]}),
    }
    for name, arrays in cases.items():
        if arrays is not None:
            np.savez(tmp_path / name, **arrays)
        with pytest.raises(UserError) as err:
            read_reference_batch(tmp_path / name)
        _one_line_naming(err, tmp_path / name)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(UserError) as err:
        read_reference_batch(tmp_path / "text.npz")
    _one_line_naming(err, tmp_path / "text.npz")
