"""Shared fixtures: tiny synthetic checkpoints, built once per session."""

import pytest

from moed.daemon.tools.synthetic import ARCHS, make_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory ``tiny_model(arch, dtype="float32") -> pathlib.Path``.

    Each (arch, dtype) checkpoint is written once per session (seed 0).
    """
    built = {}

    def get(arch: str, dtype: str = "float32"):
        if (arch, dtype) not in built:
            path = tmp_path_factory.mktemp(f"tiny-{arch}-{dtype}")
            make_model(path, arch, "tiny", dtype=dtype, seed=0, progress=False)
            built[arch, dtype] = path
        return built[arch, dtype]

    return get


@pytest.fixture(scope="session")
def tiny_models(tiny_model):
    """``{arch: path}`` of the float32 tiny checkpoints of every arch."""
    return {arch: tiny_model(arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def big_model(tmp_path_factory):
    """A `small` qwen3_moe checkpoint (~250 MB, mostly experts) for memory-bound tests."""
    path = tmp_path_factory.mktemp("small-qwen3_moe")
    make_model(path, "qwen3_moe", "small", seed=0, progress=False)
    return path
