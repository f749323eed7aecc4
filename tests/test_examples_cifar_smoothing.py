"""Smoke tests (--quick) of the CIFAR-10 and smoothing examples, CIFAR from a tiny file in the
official format (the real data set is never downloaded in tests)."""

from __future__ import annotations

import io
import pickle
import re
import tarfile

import numpy
import pytest
from example_runner import run_quick


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    rng = numpy.random.default_rng(0)
    path = tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, n in [*((f"data_batch_{i}", 130) for i in range(1, 6)), ("test_batch", 100)]:
            blob = pickle.dumps({b"batch_label": b"synthetic", b"labels": rng.integers(0, 10, n).tolist(),
                                 b"data": rng.integers(0, 256, (n, 3072), dtype=numpy.uint8),
                                 b"filenames": [b"x.png"] * n}, protocol=4)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.mark.parametrize("framework, objective", [("torch", "ibp"), ("torch", "noise"), ("keras", "noise")])
def test_cifar_example_quick(tiny_cifar, tmp_path, framework, objective):
    if framework == "keras":
        pytest.importorskip("tensorflow")
    out = run_quick(framework, f"cifar_cnn.py --objective {objective} --data-path {tiny_cifar}", tmp_path,
                    timeout=300)
    assert "540 training images" in out  # 650 training images minus the 10% validation split
    if objective == "noise":
        assert re.search(r"smoothing certified \(p>=0\.999\), L2 r=0\.25: \d+\.\d\d%", out)
    else:
        assert re.search(r"robeval ibp certified, eps=0\.007843: \d+\.\d\d%", out)


def test_smoothing_mnist_example_quick(tmp_path):
    out = run_quick("torch", "smoothing_mnist.py", tmp_path, timeout=300)
    assert re.search(r"certified \(p>=0\.999\), L2 r=0\.5: \d+\.\d\d%", out)
    assert (tmp_path / "smoothing_mnist.json").exists()
