"""Data sets for certification and attacks: checked float32 NCHW images in [0, 1] with int64 labels.

>>> from robeval.data import load_dataset
>>> ds = load_dataset("digits", split="test")    # offline, from scikit-learn
>>> ds.x.shape, ds.y.shape
((450, 1, 8, 8), (450,))

``load_dataset(spec)`` takes a built-in name (:data:`DATASETS`: "mnist", "digits", "cifar10",
"cifar100"; CIFAR is described in :mod:`robeval.data.cifar`), an image folder with one sub-folder
per class (:mod:`robeval.data.folders`) or the path of a user ``.npz`` with arrays ``x`` and ``y``.
MNIST is looked for, in this order (first hit wins):

1. ``path=`` (the Keras ``mnist.npz``, an IDX file, or a directory holding either); when given it
   is the only place looked at;
2. ``$ROBEVAL_DATA`` (a file or a directory);
3. the cache directory: ``$ROBEVAL_CACHE``, else ``$XDG_CACHE_HOME/robeval``, else ``~/.cache/robeval``;
4. only with ``download=True`` (the default): the Keras ``mnist.npz`` is downloaded into the cache
   and its SHA-256 verified before it is moved into place.

Directories are searched directly and in their ``mnist/`` and ``MNIST/raw/`` subfolders. When
nothing is found a DataNotFoundError lists every place looked at and how to provide the data.
"""

from .arrays import LAYOUTS, detect_layout, to_images, to_labels
from .datasets import DATASETS, SAMPLE_SHAPES, SPLITS, Dataset, load_dataset
from .mnist import cache_dir, read_idx
from .shapes import check_against_input_shape

__all__ = [
    "DATASETS",
    "LAYOUTS",
    "SAMPLE_SHAPES",
    "SPLITS",
    "Dataset",
    "cache_dir",
    "check_against_input_shape",
    "detect_layout",
    "load_dataset",
    "read_idx",
    "to_images",
    "to_labels",
]
