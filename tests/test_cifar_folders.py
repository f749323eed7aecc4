"""CIFAR from tiny files in the real format (never downloaded), the restricted unpickler, image folders."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy
import pytest

from robeval.data import load_dataset
from robeval.data.safe_pickle import RestrictedUnpickler, UnsafePickleError, safe_loads
from robeval.errors import DataNotFoundError, DataRangeError

FOLDER = "cifar-10-batches-py"


def batch(rng, n, classes=10, label_key=b"labels"):
    return {b"batch_label": b"tiny batch", label_key: rng.integers(0, classes, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=numpy.uint8),
            b"filenames": [b"f%d.png" % i for i in range(n)]}


def write_cifar10(path, rng, per_batch=3, extra=None):
    """A tar.gz with the official member names; returns the batches written."""
    batches = {f"data_batch_{i}": batch(rng, per_batch) for i in range(1, 6)}
    batches["test_batch"] = batch(rng, per_batch + 1)
    with tarfile.open(path, "w:gz") as tar:
        members = {k: pickle.dumps(v, protocol=4) for k, v in batches.items()}
        members["batches.meta"] = pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=4)
        members.update(extra or {})
        for name, blob in members.items():
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return batches


def test_cifar10_tarball_read_in_order(tmp_path):
    rng = numpy.random.default_rng(0)
    tarball = tmp_path / "cifar-10-python.tar.gz"
    batches = write_cifar10(tarball, rng)
    train = load_dataset("cifar10", split="train", path=tarball)
    assert train.x.shape == (15, 3, 32, 32) and train.name == "cifar10:train"
    want = numpy.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    numpy.testing.assert_array_equal(train.x, want.astype(numpy.float32) / 255)
    assert train.y.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    test = load_dataset("cifar10", split="test", path=tmp_path, limit=2)  # the folder holding the tarball
    assert test.x.shape == (2, 3, 32, 32) and test.y.tolist() == batches["test_batch"][b"labels"][:2]
    # channel order: the first 1024 values of a row are the red plane
    assert test.x[0, 0, 0, 0] == pytest.approx(batches["test_batch"][b"data"][0, 0] / 255)
    assert test.x[0, 1, 0, 0] == pytest.approx(batches["test_batch"][b"data"][0, 1024] / 255)


def test_cifar10_from_env_and_extracted_folder(tmp_path, monkeypatch):
    rng = numpy.random.default_rng(1)
    tarball = tmp_path / "c.tar.gz"
    batches = write_cifar10(tarball, rng)
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    monkeypatch.setenv("ROBEVAL_DATA", str(tmp_path / "x"))
    ds = load_dataset("cifar10", download=False)
    assert ds.y.tolist() == batches["test_batch"][b"labels"]


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_batch_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _RunsShell(marker), b"labels": [0]}, protocol=4)
    tarball = tmp_path / "cifar-10-python.tar.gz"
    rng = numpy.random.default_rng(2)
    write_cifar10(tarball, rng, extra={"test_batch": evil})
    with pytest.raises(UnsafePickleError, match="refused to unpickle the global (posix|os|nt).system"):
        load_dataset("cifar10", split="test", path=tarball)
    assert not marker.exists()
    # the restricted unpickler refuses any other global, e.g. builtins.eval
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(eval, protocol=2), "x")


def test_restricted_unpickler_allows_exactly_numpy_reconstruction():
    u = RestrictedUnpickler(io.BytesIO(b""))
    assert u.find_class("numpy.core.multiarray", "_reconstruct") is u.find_class("numpy._core.multiarray",
                                                                                 "_reconstruct")
    assert u.find_class("numpy", "ndarray") is numpy.ndarray and u.find_class("numpy", "dtype") is numpy.dtype
    for module, name in [("numpy", "load"), ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
                         ("builtins", "getattr"), ("numpy.core.multiarray", "ndarray")]:
        with pytest.raises(UnsafePickleError):
            u.find_class(module, name)


def test_cifar_not_found_lists_places(tmp_path):
    with pytest.raises(DataNotFoundError, match="looked at"):
        load_dataset("cifar10", path=tmp_path)


def test_cifar100_and_npz(tmp_path):
    rng = numpy.random.default_rng(3)
    tarball = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, n in (("train", 4), ("test", 2)):
            blob = pickle.dumps(batch(rng, n, 100, b"fine_labels"), protocol=4)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    assert load_dataset("cifar100", split="train", path=tarball).x.shape == (4, 3, 32, 32)
    npz = tmp_path / "c.npz"
    numpy.savez(npz, x_test=rng.integers(0, 256, (3, 32, 32, 3), dtype=numpy.uint8), y_test=[1, 2, 3],
                x_train=numpy.zeros((1, 32, 32, 3), numpy.uint8), y_train=[0])
    ds = load_dataset("cifar10", path=npz)
    assert ds.x.shape == (3, 3, 32, 32) and ds.y.tolist() == [1, 2, 3]


def make_folder(root, sizes=((4, 5),), mode="RGB"):
    from PIL import Image

    rng = numpy.random.default_rng(4)
    arrays = {}
    for cls, count in (("cat", 2), ("dog", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            h, w = sizes[min(i, len(sizes) - 1)]
            a = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=numpy.uint8)
            Image.fromarray(a, mode).save(root / cls / f"{i}.png")
            arrays[(cls, i)] = a
    return arrays


def test_image_folder_rgb(tmp_path):
    arrays = make_folder(tmp_path / "imgs")
    ds = load_dataset(str(tmp_path / "imgs"))
    assert ds.x.shape == (3, 3, 4, 5) and ds.y.tolist() == [0, 0, 1]
    numpy.testing.assert_allclose(ds.x[2], arrays[("dog", 0)].transpose(2, 0, 1) / 255, atol=1e-7)


def test_image_folder_grey_and_errors(tmp_path):
    make_folder(tmp_path / "g", mode="L")
    assert load_dataset(str(tmp_path / "g")).x.shape == (3, 1, 4, 5)
    make_folder(tmp_path / "mixed", sizes=((4, 5), (6, 6)))
    with pytest.raises(DataRangeError, match="different sizes"):
        load_dataset(str(tmp_path / "mixed"))
    make_folder(tmp_path / "junk")
    (tmp_path / "junk" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataRangeError, match="notes.txt"):
        load_dataset(str(tmp_path / "junk"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="no class sub-folders"):
        load_dataset(str(tmp_path / "empty"))


def test_download_checksums_are_the_published_ones():
    """The MD5s pooch verifies are the 'python version' rows of https://www.cs.toronto.edu/~kriz/cifar.html
    (a typo here would make every download fail, or accept the wrong file)."""
    from robeval.data.cifar import SOURCES

    published = {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
                 "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}
    assert {v[0]: v[7] for v in SOURCES.values()} == published
    assert all(v[6] == f"https://www.cs.toronto.edu/~kriz/{v[0]}" for v in SOURCES.values())
