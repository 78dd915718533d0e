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


def write_tiny_latents(home, *, n: int = 4, seed: int = 0, teacher: str = "tiny-random", family: str = "wan2.1",
                       shape=(16, 3, 4, 4), text_dim: int = 32, seq: int = 32, name: str | None = None):
    """A latents artifact laid out as `tmd encode-latents` writes it for the tiny-random teacher (9x32x32 clips),
    with seeded random latents and text embeddings: training stages run on it in seconds."""
    from tmdcli.artifacts.store import Store
    from tmdcli.data.shards import NEGATIVE_FILE, latents_shard_name, write_latents_shard, write_negative

    g = torch.Generator().manual_seed(seed)
    identity = {"seed": seed, "n": n, "teacher": teacher, "family": family, "shape": list(shape), "text_dim": text_dim}
    staging = Store(home).begin(kind="latents", stage="encode-latents", stage_version=1, config=identity,
                                identity_config=identity, name=name)
    lengths = torch.tensor([3 + i % 4 for i in range(n)])
    text = torch.zeros(n, seq, text_dim)
    for i in range(n):
        text[i, :lengths[i]] = torch.randn(int(lengths[i]), text_dim, generator=g)
    meta = {"shard": 0, "latent_shape": list(shape), "max_sequence_length": seq, "text_dim": text_dim,
            "prompts": [f"prompt number {i}" for i in range(n)], "seeds": list(range(n)), "failed": []}
    with staging.atomic_path(latents_shard_name(0)) as tmp:
        write_latents_shard(tmp, ids=list(range(n)), latents_BCTHW=torch.randn(n, *shape, generator=g),
                            text_BSD=text, text_lengths_B=lengths, meta=meta, dtype=torch.float32)
    negative = torch.zeros(1, seq, text_dim)
    negative[0, :5] = torch.randn(5, text_dim, generator=g)
    with staging.atomic_path(NEGATIVE_FILE) as tmp:
        write_negative(tmp, text_1SD=negative, length=5, prompt="bad things", dtype=torch.float32)
    return staging.commit(facts={"num_items": n, "latent_shape": list(shape), "teacher": teacher,
                                 "teacher_family": family, "text_dim": text_dim, "max_sequence_length": seq,
                                 "num_frames": 9, "height": 32, "width": 32})


@pytest.fixture()
def tiny_latents(home):
    return write_tiny_latents(home)
