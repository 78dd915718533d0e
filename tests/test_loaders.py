"""The training loader over latents artifacts: shapes, zero re-padding, seeded shuffle, rank shares, exact resume."""

import pytest
import torch

from tmdcli.artifacts.store import Store
from tmdcli.data.loaders import LatentLoader
from tmdcli.data.shards import NEGATIVE_FILE, latents_shard_name, write_latents_shard, write_negative
from tmdcli.errors import ArtifactError

SEQ, DIM, SHAPE = 12, 6, (4, 2, 3, 3)


def item_tensors(i):
    """Deterministic per-item data: latent filled from the id, text of true length 1 + i % 5."""
    g = torch.Generator().manual_seed(i)
    length = 1 + i % 5
    text = torch.zeros(SEQ, DIM)
    text[:length] = torch.randn(length, DIM, generator=g)
    return torch.randn(*SHAPE, generator=g), text, length


def make_latents(home, n=10, shard_sizes=(4, 4, 2), dtype=torch.float32, tag=0):
    """A latents artifact as encode-latents writes it, with the items spread over shards of the given sizes."""
    assert sum(shard_sizes) == n
    staging = Store(home).begin(kind="latents", stage="encode-latents", stage_version=1, config={"tag": tag},
                                identity_config={"tag": tag, "sizes": list(shard_sizes), "dtype": str(dtype)})
    ids = list(range(n))[::-1]  # ids need not be in shard order
    start = 0
    for k, size in enumerate(shard_sizes):
        chunk = ids[start:start + size]
        start += size
        data = [item_tensors(i) for i in chunk]
        meta = {"shard": k, "latent_shape": list(SHAPE), "max_sequence_length": SEQ, "text_dim": DIM,
                "prompts": [f"prompt {i}" for i in chunk], "seeds": chunk, "failed": []}
        with staging.atomic_path(latents_shard_name(k)) as tmp:
            write_latents_shard(tmp, ids=chunk, latents_BCTHW=torch.stack([d[0] for d in data]),
                                text_BSD=torch.stack([d[1] for d in data]),
                                text_lengths_B=torch.tensor([d[2] for d in data]), meta=meta, dtype=dtype)
    negative = torch.zeros(1, SEQ, DIM)
    negative[0, :7] = 1.5
    with staging.atomic_path(NEGATIVE_FILE) as tmp:
        write_negative(tmp, text_1SD=negative, length=7, prompt="bad things", dtype=dtype)
    return staging.commit(facts={"num_items": n})


def ids_of(loader, epochs=1):
    out = []
    for _ in range(epochs):
        out.append([i for batch in loader for i in batch["ids"].tolist()])
    return out


def test_batch_has_the_documented_shapes_dtypes_and_zero_padding(home):
    artifact = make_latents(home, dtype=torch.bfloat16)
    loader = LatentLoader(artifact, batch_size=3, seed=0, rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["latents"].shape == (3, *SHAPE) and batch["latents"].dtype == torch.float32
    assert batch["text"].shape == (3, SEQ, DIM) and batch["text"].dtype == torch.float32
    assert batch["negative"].shape == (1, SEQ, DIM) and batch["ids"].dtype == torch.int64
    for b, item_id in enumerate(batch["ids"].tolist()):
        latent, text, length = item_tensors(item_id)
        assert batch["text_lengths"][b] == length and batch["prompts"][b] == f"prompt {item_id}"
        # bf16 storage: values round-trip through bfloat16, padding is exactly zero
        assert torch.equal(batch["latents"][b], latent.to(torch.bfloat16).float())
        assert torch.equal(batch["text"][b], text.to(torch.bfloat16).float())
        assert batch["text"][b, length:].abs().max() == 0
    assert torch.equal(batch["negative"][0, :7], torch.full((7, DIM), 1.5))
    assert batch["negative"][0, 7:].abs().max() == 0
    assert loader.negative_prompt == "bad things"
    wide = LatentLoader(artifact, batch_size=3, rank=0, world_size=1, expand_negative=True)
    assert next(iter(wide))["negative"].shape == (3, SEQ, DIM)


def test_float32_storage_is_exact(home):
    loader = LatentLoader(make_latents(home), batch_size=10, shuffle=False, drop_last=False, rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["ids"].tolist() == list(range(10))  # id order without shuffle, whatever the shard layout
    assert all(torch.equal(batch["latents"][i], item_tensors(i)[0]) for i in range(10))


def test_each_epoch_is_a_seeded_permutation_independent_of_the_shard_layout(home, tmp_path):
    a = make_latents(home)
    b = make_latents(tmp_path / "other", shard_sizes=(7, 3))
    first = LatentLoader(a, batch_size=2, seed=5, drop_last=False, rank=0, world_size=1)
    epochs = ids_of(first, epochs=3)
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # a new order per epoch
    assert ids_of(LatentLoader(b, batch_size=5, seed=5, rank=0, world_size=1), epochs=3) == epochs
    assert ids_of(LatentLoader(a, batch_size=2, seed=6, rank=0, world_size=1))[0] != epochs[0]


def test_ranks_get_disjoint_equal_shares(home):
    artifact = make_latents(home)
    shares = [ids_of(LatentLoader(artifact, batch_size=1, seed=1, rank=r, world_size=3))[0] for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    flat = [i for s in shares for i in s]
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    loader = LatentLoader(artifact, batch_size=2, seed=1, rank=0, world_size=3)
    assert len(loader) == 1  # 3 items, drop_last


@pytest.mark.parametrize("batch_size,drop_last", [(3, True), (4, False)])
def test_state_dict_resumes_exactly_across_epochs(home, batch_size, drop_last):
    artifact = make_latents(home)
    reference = LatentLoader(artifact, batch_size=batch_size, seed=3, drop_last=drop_last, rank=1, world_size=2)
    stream = reference.batches()
    expected = [next(stream)["ids"].tolist() for _ in range(7)]  # crosses at least two epoch ends
    for cut in range(1, 7):
        first = LatentLoader(artifact, batch_size=batch_size, seed=3, drop_last=drop_last, rank=1, world_size=2)
        it = first.batches()
        got = [next(it)["ids"].tolist() for _ in range(cut)]
        state = first.state_dict()
        resumed = LatentLoader(artifact, batch_size=batch_size, seed=3, drop_last=drop_last, rank=1, world_size=2)
        resumed.load_state_dict(state)
        it = resumed.batches()
        got += [next(it)["ids"].tolist() for _ in range(7 - cut)]
        assert got == expected, cut


def test_incompatible_state_and_wrong_kind_are_refused(home):
    artifact = make_latents(home)
    state = LatentLoader(artifact, batch_size=2, seed=0, rank=0, world_size=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        LatentLoader(artifact, batch_size=2, seed=1, rank=0, world_size=1).load_state_dict(state)
    # another world size continues only from an item count that splits evenly over its ranks (resume_position)
    with pytest.raises(ValueError, match="cannot continue from exactly there"):
        LatentLoader(artifact, batch_size=2, seed=0, rank=0, world_size=2).load_state_dict({**state, "position": 1})
    staging = Store(home).begin(kind="videos", stage="synth-videos", stage_version=1, config={}, identity_config={})
    staging.write_bytes("x.bin", b"x")
    videos = staging.commit()
    with pytest.raises(ArtifactError, match="loader reads latents"):
        LatentLoader(videos, batch_size=1)
    assert LatentLoader("latents:latest", home=home, batch_size=2).artifact.id == artifact.id
