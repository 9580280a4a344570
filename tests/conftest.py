import pytest

from epkern import _cuda


def pytest_collection_modifyitems(config, items):
    if _cuda.gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
