"""Tests for robeval.data: MNIST search/IDX/download, digits, user .npz files, shape matching.

Everything runs offline: an autouse fixture points the cache at tmp_path and the download URL at a
file that does not exist, so a test that forgets download=False fails instead of reaching the network.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from robeval.data import DATASETS, Dataset, check_against_input_shape, load_dataset, read_idx
from robeval.data import mnist as mnist_module
from robeval.errors import (
    DataNotFoundError,
    DataRangeError,
    InputShapeError,
    InvalidParameterError,
    RobevalError,
)

MNIST_FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # standard MNIST t10k order


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache directory, no $ROBEVAL_DATA, and a download URL that cannot reach the network."""
    monkeypatch.setenv("ROBEVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ROBEVAL_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(mnist_module, "MNIST_URL", (tmp_path / "no-such-download.npz").as_uri())
    return tmp_path / "cache"


@pytest.fixture
def mnist_file() -> Path:
    shared = Path(os.environ.get("ROBEVAL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    default = shared / "data" / "mnist.npz"
    path = Path(os.environ.get("ROBEVAL_TEST_MNIST", default))
    if not path.is_file():
        pytest.skip(f"MNIST file not found at {path}; set ROBEVAL_TEST_MNIST to a Keras mnist.npz")
    return path


def fake_mnist(n_train: int = 12, n_test: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file by hand (header: 0, 0, type 0x08=uint8, ndim, big-endian dims)."""
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


# --- MNIST from the real file --------------------------------------------------------------------


def check_real_mnist_test(ds: Dataset, raw_path: Path) -> None:
    assert len(ds) == 10_000 and ds.x.shape == (10_000, 1, 28, 28)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.y[:10].tolist() == MNIST_FIRST_TEST_LABELS
    with np.load(raw_path) as f:
        np.testing.assert_array_equal(ds.x[:50, 0], f["x_test"][:50] / np.float32(255))


def test_mnist_via_path(mnist_file):
    ds = load_dataset("mnist", path=mnist_file, download=False)
    check_real_mnist_test(ds, mnist_file)
    assert ds.name == "mnist:test" and ds.layout == "NCHW"
    from_dir = load_dataset("mnist", path=mnist_file.parent, limit=3, download=False)
    assert from_dir.y.tolist() == MNIST_FIRST_TEST_LABELS[:3]


@pytest.mark.parametrize("point_at", ["directory", "file"])
def test_mnist_via_env(mnist_file, monkeypatch, point_at):
    monkeypatch.setenv("ROBEVAL_DATA", str(mnist_file.parent if point_at == "directory" else mnist_file))
    check_real_mnist_test(load_dataset("mnist", download=False), mnist_file)


# --- MNIST search order, IDX files, download -----------------------------------------------------


def test_env_comes_before_cache(tmp_path, cache, monkeypatch):
    env_arrays, cache_arrays = fake_mnist(seed=1), fake_mnist(seed=2)
    (tmp_path / "env").mkdir()
    cache.mkdir()
    np.savez(tmp_path / "env" / "mnist.npz", **env_arrays)
    np.savez(cache / "mnist.npz", **cache_arrays)
    monkeypatch.setenv("ROBEVAL_DATA", str(tmp_path / "env"))
    np.testing.assert_array_equal(load_dataset("mnist", download=False).y, env_arrays["y_test"])
    monkeypatch.delenv("ROBEVAL_DATA")
    np.testing.assert_array_equal(load_dataset("mnist", download=False).y, cache_arrays["y_test"])


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_files_equal_npz(tmp_path, suffix):
    arrays = fake_mnist()
    np.savez(tmp_path / "mnist.npz", **arrays)
    idx_dir = tmp_path / "idx" / "MNIST" / "raw"  # torchvision's layout, found from the root
    idx_dir.mkdir(parents=True)
    for prefix, split in (("train", "train"), ("t10k", "test")):
        write_idx(idx_dir / f"{prefix}-images-idx3-ubyte{suffix}", arrays[f"x_{split}"])
        write_idx(idx_dir / f"{prefix}-labels-idx1-ubyte{suffix}", arrays[f"y_{split}"])
    for split in ("train", "test"):
        from_idx = load_dataset("mnist", split=split, path=tmp_path / "idx", download=False)
        from_npz = load_dataset("mnist", split=split, path=tmp_path / "mnist.npz", download=False)
        np.testing.assert_array_equal(from_idx.x, from_npz.x)
        np.testing.assert_array_equal(from_idx.y, from_npz.y)
        np.testing.assert_array_equal(from_idx.x[:, 0], arrays[f"x_{split}"] / np.float32(255))


def test_read_idx_other_dtype_and_truncation(tmp_path):
    values = np.arange(-3, 9, dtype=">i4").reshape(3, 4)
    header = bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 3, 4)
    (tmp_path / "ints-idx2-int").write_bytes(header + values.tobytes())
    out = read_idx(tmp_path / "ints-idx2-int")
    assert out.dtype == np.int32 and out.tolist() == values.tolist()
    (tmp_path / "short").write_bytes(header + values.tobytes()[:-4])
    with pytest.raises(RobevalError, match="truncated"):
        read_idx(tmp_path / "short")


def serve_fake_mnist(tmp_path, monkeypatch, digest: str | None = None) -> tuple[dict, bytes]:
    arrays = fake_mnist(seed=3)
    source = tmp_path / "upstream" / "mnist.npz"
    source.parent.mkdir()
    np.savez(source, **arrays)
    content = source.read_bytes()
    monkeypatch.setattr(mnist_module, "MNIST_URL", source.as_uri())
    monkeypatch.setattr(mnist_module, "MNIST_SHA256", (digest or hashlib.sha256(content).hexdigest(),))
    return arrays, content


def test_download_verifies_and_caches(tmp_path, cache, monkeypatch):
    arrays, content = serve_fake_mnist(tmp_path, monkeypatch)
    ds = load_dataset("mnist", split="train", download=True)
    np.testing.assert_array_equal(ds.y, arrays["y_train"])
    np.testing.assert_array_equal(ds.x[:, 0], arrays["x_train"] / np.float32(255))
    assert [p.name for p in cache.iterdir()] == ["mnist.npz"]  # no temporary file left behind
    assert (cache / "mnist.npz").read_bytes() == content
    # now found in the cache, so even a broken URL does not matter
    monkeypatch.setattr(mnist_module, "MNIST_URL", (tmp_path / "gone.npz").as_uri())
    assert len(load_dataset("mnist", download=True)) == len(arrays["y_test"])


def test_download_with_wrong_hash_leaves_nothing(tmp_path, cache, monkeypatch):
    _, content = serve_fake_mnist(tmp_path, monkeypatch, digest="0" * 64)
    with pytest.raises(RobevalError, match="SHA-256") as info:
        load_dataset("mnist", download=True)
    assert hashlib.sha256(content).hexdigest() in str(info.value) and "0" * 64 in str(info.value)
    assert list(cache.iterdir()) == []


def test_download_failure_is_data_not_found(cache):
    with pytest.raises(DataNotFoundError, match="no-such-download.npz failed"):
        load_dataset("mnist", download=True)


def test_missing_mnist_lists_every_place(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("ROBEVAL_DATA", str(tmp_path / "data"))
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", download=False)
    message = str(info.value)
    for expected in (
        f"$ROBEVAL_DATA={tmp_path / 'data'} (does not exist)",
        f"cache: {cache}",
        "download: disabled (download=False)",
        "t10k-images-idx3-ubyte[.gz]",
        "path=",  # the three fixes
        "ROBEVAL_DATA=DIR",
        "download=True",
    ):
        assert expected in message, (expected, message)
    with pytest.raises(DataNotFoundError, match=r"path=.*typo \(does not exist\)[\s\S]*not tried"):
        load_dataset("mnist", path=tmp_path / "typo", download=True)


def test_known_hashes_include_upstream_and_reference_copy():
    assert "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1" in mnist_module.MNIST_SHA256
    assert "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64" in mnist_module.MNIST_SHA256


# --- digits and user files ----------------------------------------------------------------------


def test_digits_split_sizes_and_values():
    from sklearn.datasets import load_digits

    reference = load_digits()
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1347, 450) and set(DATASETS) == {"mnist", "digits", "cifar10", "cifar100"}
    assert train.x.shape == (1347, 1, 8, 8) and test.x.shape == (450, 1, 8, 8)
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    np.testing.assert_allclose(test.x[:, 0], reference.images[1347:] / 16, rtol=1e-7)
    np.testing.assert_array_equal(np.concatenate([train.y, test.y]), reference.target)


def test_user_npz_nhwc_uint8_is_converted(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=x, y=np.arange(5))
    ds = load_dataset(tmp_path / "rgb.npz")
    assert ds.x.shape == (5, 3, 6, 7) and ds.name == "rgb"
    np.testing.assert_array_equal(ds.x, x.transpose(0, 3, 1, 2) / np.float32(255))
    # an ambiguous shape is refused without layout= and follows it when given (tests/test_data_layout.py)
    amb = np.zeros((4, 3, 5, 3), np.uint8)
    np.savez(tmp_path / "amb.npz", x=amb, y=np.zeros(4, int))
    with pytest.raises(InputShapeError, match="could be NCHW"):
        load_dataset(str(tmp_path / "amb.npz"))
    assert load_dataset(str(tmp_path / "amb.npz"), layout="NCHW").x.shape == (4, 3, 5, 3)
    assert load_dataset(str(tmp_path / "amb.npz"), layout="NHWC").x.shape == (4, 3, 3, 5)


def test_user_npz_split_arrays_and_grayscale(tmp_path):
    x = np.linspace(0, 1, 3 * 4 * 4, dtype=np.float64).reshape(3, 4, 4)
    np.savez(tmp_path / "s.npz", x_test=x, y_test=[2, 0, 1], x_train=x[:1], y_train=[5])
    test = load_dataset(tmp_path / "s.npz", limit=2)
    assert test.x.shape == (2, 1, 4, 4) and test.y.tolist() == [2, 0] and test.name == "s:test"
    np.testing.assert_allclose(test.x[:, 0], x[:2].astype(np.float32))
    assert load_dataset(tmp_path / "s.npz", split="train").y.tolist() == [5]


def test_nan_data_counts_bad_values(tmp_path):
    x = np.full((4, 8, 8), 0.5)
    x[0, 0, :2] = np.nan
    x[3, 1, 1] = np.inf
    np.savez(tmp_path / "nan.npz", x=x, y=np.zeros(4, int))
    with pytest.raises(DataRangeError, match=r"has 3 NaN/inf value\(s\) out of 256"):
        load_dataset(tmp_path / "nan.npz")


def test_out_of_range_float_names_min_max_and_fix(tmp_path):
    x = np.linspace(0, 255, 2 * 8 * 8).reshape(2, 8, 8)
    np.savez(tmp_path / "raw.npz", x=x, y=[1, 2])
    with pytest.raises(DataRangeError) as info:
        load_dataset(tmp_path / "raw.npz")
    message = str(info.value)
    assert "[0, 255]" in message and "divide by 255" in message and "value_range=(0, 255)" in message
    ds = load_dataset(tmp_path / "raw.npz", value_range=(0, 255))
    assert ds.value_range == (0.0, 255.0) and ds.x.max() == 255.0


@pytest.mark.parametrize("split", ["val", "validation", "TEST", None])
def test_bad_split(split):
    with pytest.raises(InvalidParameterError, match=r"expected one of 'train', 'test'"):
        load_dataset("digits", split=split)


@pytest.mark.parametrize("limit", [0, -3, 2.5, True, "10"])
def test_bad_limit(limit):
    with pytest.raises(InvalidParameterError, match="expected a positive integer"):
        load_dataset("digits", limit=limit)


def test_limit_and_unknown_names(tmp_path):
    assert len(load_dataset("digits", limit=7)) == 7 and len(load_dataset("digits", limit=10**6)) == 450
    with pytest.raises(InvalidParameterError, match="'mnist', 'digits'"):
        load_dataset("mnsit")
    with pytest.raises(DataNotFoundError, match="no file at"):
        load_dataset(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x_train=np.zeros((2, 4, 4)), y_train=[0, 1])
    with pytest.raises(DataNotFoundError, match="pass split='train'"):
        load_dataset(tmp_path / "other.npz")


def test_bad_labels(tmp_path):
    np.savez(tmp_path / "onehot.npz", x=np.zeros((3, 4, 4)), y=np.eye(3))
    with pytest.raises(InputShapeError, match=r"y.argmax\(axis=1\)"):
        load_dataset(tmp_path / "onehot.npz")


# --- Dataset and shape matching -----------------------------------------------------------------


@pytest.fixture
def small() -> Dataset:
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    return Dataset(x, np.array([4, 0, 9]), "small")


def test_dataset_layout_subset_and_checks(small):
    nhwc = small.to_layout("NHWC")
    assert nhwc.x.shape == (3, 8, 8, 1) and nhwc.layout == "NHWC"
    assert repr(nhwc) == (
        "Dataset(name='small', x=float32(3, 8, 8, 1), y=int64(3,), layout='NHWC', value_range=(0.0, 1.0))"
    )
    np.testing.assert_array_equal(nhwc.to_layout("NCHW").x, small.x)
    assert small.subset(2).y.tolist() == [4, 0] and small.to_layout("NCHW") is small
    with pytest.raises(dataclasses.FrozenInstanceError):
        small.name = "other"
    with pytest.raises(DataRangeError, match="dtype uint8"):
        Dataset(np.zeros((1, 1, 2, 2), np.uint8), [0], "u8")
    with pytest.raises(DataRangeError, match=r"values in \[2, 2\].*value_range=\(0, 2\)"):
        Dataset(np.full((1, 1, 2, 2), 2.0), [0], "big")
    with pytest.raises(InvalidParameterError, match="'NCHW', 'NHWC'"):
        small.to_layout("CHW")


def test_check_against_input_shape_transposes(small):
    np.testing.assert_array_equal(check_against_input_shape(small, (1, 8, 8)), small.x)
    expected_nhwc = small.x.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(check_against_input_shape(small, (None, 8, 8, 1), channels_last=True),
                                  expected_nhwc)
    # the model's layout was guessed wrong: the transposed data still fit
    np.testing.assert_array_equal(check_against_input_shape(small, (8, 8, 1)), expected_nhwc)
    np.testing.assert_array_equal(check_against_input_shape(small.to_layout("NHWC"), (1, 8, 8)), small.x)
    np.testing.assert_array_equal(check_against_input_shape(small, (64,)), small.x.reshape(3, 64))


def test_check_against_input_shape_raises_with_hint(small):
    with pytest.raises(InputShapeError) as info:
        check_against_input_shape(small, (1, 28, 28))
    message = str(info.value)
    assert "(3, 1, 8, 8)" in message and "per sample (1, 8, 8)" in message
    assert "expects (1, 28, 28)" in message and "--data mnist" in message
    with pytest.raises(InputShapeError, match="right size, or resize"):
        check_against_input_shape(small, (3, 16, 16))
    with pytest.raises(InputShapeError, match="--data cifar10"):
        check_against_input_shape(small, (3, 32, 32))
