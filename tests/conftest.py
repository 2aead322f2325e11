"""Shared test setup: GPU-marked tests are skipped where CUDA is missing."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in keywords`: ids may say "gpu"
            item.add_marker(skip)
