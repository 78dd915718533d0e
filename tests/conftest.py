"""Shared fixtures: hermetic tiny random Wan components (built in code, never downloaded) and a temporary home."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("TMD_TEACHER_OVERRIDE", None)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_teacher():
    """The `tiny-random` teacher (4 blocks, 9x32x32 videos) in fp32 on the CPU."""
    from tmdcli.registry import load_teacher

    return load_teacher("tiny-random", device="cpu", dtype="float32")


@pytest.fixture()
def fresh_tiny_transformer():
    """A private copy of the tiny transformer, for tests that train or mutate it."""
    from tmdcli.models.tiny import build_tiny_components

    return build_tiny_components(seed=0)["transformer"]


@pytest.fixture()
def home(tmp_path):
    return tmp_path / "home"
