"""synth-videos and encode-latents on the tiny-random teacher: artifacts, seeds, resume after SIGKILL, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from tmdcli.artifacts.store import Store
from tmdcli.cli import app
from tmdcli.data.shards import VideosShard, read_latents_meta, write_videos_shard

runner = CliRunner()
TINY = ["--teacher", "tiny-random", "--frames", "5", "--height", "32", "--width", "32", "--steps", "4",
        "--shard-size", "2", "--batch-size", "2"]
WORDS = ["a cat surfing", "a dog runs in the city", "red car at night", "blue ocean wave", "green video slow motion",
         "the cat on the car", "a dog with a red car", "bright wave at night"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def tmd(*args, home):
    return runner.invoke(app, [*args, "--home", str(home)])


def make_prompts(home, n=8, seeds=True):
    """A prompts artifact as make-prompts writes it (prompts.parquet with the agreed columns)."""
    columns = {"id": pa.array(range(n), pa.int64()), "source_prompt": [WORDS[i % 8] for i in range(n)],
               "prompt": [WORDS[i % 8] for i in range(n)], "expander": ["none"] * n, "spec": [""] * n}
    if seeds:
        columns["seed"] = pa.array([100 + 7 * i for i in range(n)], pa.int64())
    staging = Store(home).begin(kind="prompts", stage="make-prompts", stage_version=1, config={"n": n},
                                identity_config={"n": n, "seeds": seeds})
    with staging.atomic_path("prompts.parquet") as tmp:
        pq.write_table(pa.table(columns), tmp)
    return staging.commit(stats={"num_items": n}, facts={"num_items": n})


def file_hashes(artifact):
    return {f["path"]: f["sha256"] for f in artifact.manifest.files}


@pytest.fixture(scope="module")
def synth_home(tmp_path_factory):
    """Prompts + videos (latents and noise saved) made by two independent `--shard i/2` jobs, in-process."""
    home = tmp_path_factory.mktemp("synth") / "home"
    make_prompts(home)
    first = tmd("synth-videos", *TINY, "--save-latents", "--save-noise", "--shard", "0/2", home=home)
    assert first.exit_code == 0, first.output
    assert first.stdout == "" and "other workers" in first.stderr  # job 0 did its half; job 1 commits
    second = tmd("synth-videos", *TINY, "--save-latents", "--save-noise", "--shard", "1/2", home=home)
    assert second.exit_code == 0, second.output
    return home


def copy_home(src, dst):
    shutil.copytree(src, dst)
    return dst


def kill_after_first_shard(argv, home, kind, pattern, timeout_s=240):
    """Start `python -m tmdcli ...`, SIGKILL it as soon as one shard is complete in its staging folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same float reductions as the in-process reference
    proc = subprocess.Popen([sys.executable, "-m", "tmdcli", *argv, "--home", str(home)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if [p for p in (home / kind).glob(f".staging-*/shards/{pattern}") if ".tmp-" not in p.name]:
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        else:
            pytest.fail("no shard appeared in time")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    staged = list((home / kind).glob(".staging-*"))
    assert len(staged) == 1 and not [p for p in (home / kind).iterdir() if not p.name.startswith(".")]
    return sorted(p.name for p in (staged[0] / "shards").iterdir())


# --- synth-videos ------------------------------------------------------------------------------------------------

def test_synth_videos_artifact_holds_mp4_prompt_seed_latent_and_noise(synth_home):
    store = Store(synth_home)
    videos = store.resolve("latest", kind="videos")
    facts = videos.manifest.facts
    assert (facts["num_items"], facts["num_failed"], facts["num_shards"]) == (8, 0, 4)
    assert (facts["num_frames"], facts["height"], facts["width"], facts["latent_shape"]) == (5, 32, 32, [16, 2, 4, 4])
    assert facts["sampler"]["num_steps"] == 4 and facts["sampler"]["flow_shift"] == 5.0 and facts["nfe_per_clip"] == 8
    assert facts["seed_rule"] == "prompts.seed" and facts["has_latents"] and facts["has_noise"]
    assert videos.manifest.config["batch_size"] == 2 and videos.manifest.inputs[0]["role"] == "prompts"
    assert videos.manifest.external_models == [{"name": "tiny-random", "revision": "builtin"}]
    assert store.verify(videos) == []
    from tmdcli.artifacts.media import read_mp4
    from tmdcli.sampler import generators_for, randn_per_sample

    with VideosShard(videos.file("shards/videos-00001.tar")) as shard:
        assert [(it["id"], it["prompt"], it["seed"]) for it in shard.items] == [(2, WORDS[2], 114), (3, WORDS[3], 121)]
        (tmp := synth_home.parent / "clip.mp4").write_bytes(shard.mp4(2))
        assert read_mp4(tmp).shape == (5, 32, 32, 3)
        tensors = shard.tensors()
    assert set(tensors) == {"latent.2", "latent.3", "noise.2", "noise.3"}
    # the stored noise is the seed's noise: one generator per prompt id, whatever the batch or worker
    assert torch.equal(tensors["noise.3"], randn_per_sample((16, 2, 4, 4), generators_for([121]))[0])


def test_rerun_is_up_to_date_and_shard_split_is_not_identity(synth_home):
    videos = Store(synth_home).resolve("latest", kind="videos")
    again = tmd("synth-videos", *TINY, "--save-latents", "--save-noise", "--batch-size", "1", home=synth_home)
    assert again.exit_code == 0 and again.stdout.strip() == str(videos.path)
    assert "up to date" in again.stderr


def test_synth_videos_sigkill_then_rerun_equals_an_uninterrupted_run(synth_home, tmp_path):
    """Killed after its first shard, then rerun: the same files, byte for byte, as the two-job run of the fixture."""
    reference = Store(synth_home).resolve("latest", kind="videos")
    home = tmp_path / "killed"
    home.mkdir()
    shutil.copytree(synth_home / "prompts", home / "prompts")
    staged = kill_after_first_shard(["synth-videos", *TINY, "--save-latents", "--save-noise"], home, "videos",
                                    "videos-*.tar")
    complete = [s for s in staged if s.endswith(".tar") and ".tmp-" not in s]
    assert 1 <= len(complete) < 4, staged
    resumed = tmd("synth-videos", *TINY, "--save-latents", "--save-noise", home=home)
    assert resumed.exit_code == 0, resumed.output
    artifact = Store(home).resolve(resumed.stdout.strip(), kind="videos")
    assert artifact.id == reference.id
    # x264 output is deterministic for equal frames and settings, and the tar/safetensors writers fix every header
    assert file_hashes(artifact) == file_hashes(reference)
    assert Store(home).verify(artifact) == []


def test_seed_column_absent_or_base_seed_given_uses_hashed_seeds(home):
    from tmdcli.stages.synth_videos import item_seed, read_prompt_items

    artifact = make_prompts(home, n=3, seeds=False)
    items, rule = read_prompt_items(artifact, None, None)
    assert rule == "sha256(0:id)" and [it["seed"] for it in items] == [item_seed(0, i) for i in range(3)]
    items, rule = read_prompt_items(artifact, 2, 7)
    assert len(items) == 2 and items[1]["seed"] == item_seed(7, 1) != item_seed(0, 1)


def test_dry_run_prints_counts_and_compute_and_writes_nothing(home):
    make_prompts(home)
    before = sorted(p.relative_to(home) for p in home.rglob("*"))
    result = tmd("synth-videos", "--teacher", "tiny-random", "--limit", "6", "--shard-size", "4", "--dry-run",
                 home=home)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "6 of 8" in result.stderr and "2 of up to 4" in result.stderr
    assert "100 transformer NFE x 6 clips = 600 forward passes" in result.stderr  # tiny-random: 50 steps x CFG
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == before


@pytest.mark.parametrize("args,needle", [
    (["--frames", "6"], "4k+1"),
    (["--height", "40"], "multiples of 16"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--shard", "2/2"], "need 0 <= i < n"),
    (["--prompts", "prompts-000000000000"], "no prompts artifact"),
    (["--teacher", "no-such-teacher"], "unknown teacher"),
])
def test_bad_synth_input_exits_2(home, args, needle):
    make_prompts(home)
    base = ["synth-videos", "--teacher", "tiny-random", "--frames", "5", "--height", "32", "--width", "32"]
    result = tmd(*base, *args, home=home)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.output and result.stdout == ""


def test_missing_wrong_kind_or_foreign_prompts_exit_2(tmp_path, home, synth_home):
    empty = tmd("synth-videos", "--teacher", "tiny-random", home=home)
    assert empty.exit_code == 2 and "no complete prompts artifact" in empty.stderr and "make-prompts" in empty.stderr
    videos = Store(synth_home).resolve("latest", kind="videos")
    wrong = tmd("synth-videos", "--teacher", "tiny-random", "--prompts", videos.id, home=synth_home)
    assert wrong.exit_code == 2 and "a prompts artifact is needed" in wrong.stderr
    foreign = Store(synth_home).resolve("latest", kind="prompts")
    other = tmd("synth-videos", "--teacher", "tiny-random", "--prompts", str(foreign.path), home=home)
    assert other.exit_code == 2 and "another home" in other.stderr


# --- encode-latents ----------------------------------------------------------------------------------------------

def test_encode_latents_reuses_sampler_latents_and_stores_compact_text(synth_home, tmp_path, tiny_teacher):
    home = copy_home(synth_home, tmp_path / "h")
    result = tmd("encode-latents", "--teacher", "tiny-random", "--batch-size", "3", home=home)
    assert result.exit_code == 0, result.output
    assert "reusing the sampler's latents" in result.stderr
    store = Store(home)
    latents = store.resolve(result.stdout.strip(), kind="latents")
    assert store.verify(latents) == [] and latents.manifest.inputs[0]["kind"] == "videos"
    facts = latents.manifest.facts
    assert (facts["num_items"], facts["num_failed"], facts["latents_reused"], facts["latents_encoded"]) == (8, 0, 8, 0)
    assert facts["storage_dtype"] == "float32" and facts["max_sequence_length"] == 32 and facts["text_dim"] == 32
    videos = store.resolve("latest", kind="videos")
    with VideosShard(videos.file("shards/videos-00002.tar")) as shard:
        saved = shard.tensors()["latent.5"]
    from safetensors import safe_open

    path = latents.file("shards/latents-00002.safetensors")
    meta = read_latents_meta(path)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("ids").tolist() == [4, 5] == meta["ids"]
        assert torch.equal(f.get_tensor("latents")[1], saved)
        text, lengths = f.get_tensor("text"), f.get_tensor("text_lengths")
    # compact: only the true-length rows are stored; they equal the Wan-style zero-padded embedding's rows
    emb = tiny_teacher.encode_prompts([WORDS[4], WORDS[5]])
    assert text.shape[0] == int(lengths.sum()) < 2 * 32
    assert torch.allclose(text[: lengths[0]], emb[0, : lengths[0]], atol=1e-6)
    assert emb[0, lengths[0]:].abs().max() == 0


def test_encode_latents_sigkill_then_rerun_equals_an_uninterrupted_run(synth_home, tmp_path):
    killed = copy_home(synth_home, tmp_path / "killed")
    clean = copy_home(synth_home, tmp_path / "clean")
    args = ["encode-latents", "--teacher", "tiny-random", "--reencode", "--batch-size", "1"]
    staged = kill_after_first_shard(args, killed, "latents", "latents-*.safetensors")
    assert 1 <= len([s for s in staged if ".tmp-" not in s]) < 4, staged
    resumed = tmd(*args, home=killed)
    assert resumed.exit_code == 0, resumed.output
    reference = tmd(*args, home=clean)
    assert reference.exit_code == 0, reference.output
    a = Store(killed).resolve(resumed.stdout.strip(), kind="latents")
    b = Store(clean).resolve(reference.stdout.strip(), kind="latents")
    assert a.id == b.id and a.manifest.facts["latents_encoded"] == 8
    assert file_hashes(a) == file_hashes(b)


def hand_made_videos(home, frames=5, mp4s=None, vae_digest="sha256:not-this-vae"):
    """A videos artifact written by hand: item 1's mp4 is garbage, item 2 has 9 frames instead of 5."""
    from tmdcli.artifacts.media import write_mp4

    rng = np.random.default_rng(0)
    clips = {}
    for item_id, n in ((0, 5), (2, 9), (3, 5)):
        write_mp4(rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8), home.parent / "c.mp4", fps=8)
        clips[item_id] = (home.parent / "c.mp4").read_bytes()
    clips[1] = b"\x00\x00\x00\x18ftypmp42 this is not a video"
    items = [{"id": i, "prompt": WORDS[i], "seed": i, "file": f"{i}.mp4"} for i in range(4)]
    staging = Store(home).begin(kind="videos", stage="synth-videos", stage_version=1, config={"hand": frames},
                                identity_config={"hand": frames})
    with staging.atomic_path("shards/videos-00000.tar") as tmp:
        write_videos_shard(tmp, index={"shard": 0, "items": items, "failed": []}, mp4s=mp4s or clips,
                           tensors={f"latent.{i}": torch.zeros(16, 2, 4, 4) for i in range(4)})
    facts = {"teacher": "tiny-random", "num_frames": frames, "height": 32, "width": 32, "num_items": 4,
             "latent_shape": [16, 2, 4, 4], "has_latents": True, "vae_digest": vae_digest}
    return staging.commit(facts=facts, stats={"num_items": 4})


def test_unreadable_or_misshapen_videos_are_skipped_and_counted_and_foreign_latents_not_reused(home):
    hand_made_videos(home)
    result = tmd("encode-latents", "--teacher", "tiny-random", home=home)
    assert result.exit_code == 0, result.output
    assert "another VAE made them" in result.stderr and "skipped video 1" in result.stderr
    latents = Store(home).resolve(result.stdout.strip(), kind="latents")
    facts, stats = latents.manifest.facts, latents.manifest.stats
    assert (stats["num_items"], stats["num_failed"]) == (2, 2) and facts["latents_reused"] == 0
    reasons = {f["id"]: f["reason"] for f in facts["failed"]}
    assert set(reasons) == {1, 2} and "cannot read video" in reasons[1] and "frames 9x32x32" in reasons[2]
    assert read_latents_meta(latents.file("shards/latents-00000.safetensors"))["ids"] == [0, 3]


@pytest.mark.parametrize("frames,needle", [(6, "4k+1"), (5, "no complete videos artifact")])
def test_bad_encode_input_exits_2(home, frames, needle):
    if frames != 5:
        hand_made_videos(home, frames=frames)
    result = tmd("encode-latents", "--teacher", "tiny-random", home=home)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and result.stdout == ""


def test_encode_wrong_kind_and_storage_dtype_exit_2(synth_home):
    prompts = Store(synth_home).resolve("latest", kind="prompts")
    assert "a videos artifact is needed" in tmd("encode-latents", "--teacher", "tiny-random", "--videos", prompts.id,
                                                home=synth_home).stderr
    bad = tmd("encode-latents", "--teacher", "tiny-random", "--storage-dtype", "int8", home=synth_home)
    assert bad.exit_code == 2 and "storage dtype" in bad.stderr


def test_encode_dry_run_writes_nothing(synth_home):
    before = sorted(p.relative_to(synth_home) for p in synth_home.rglob("*"))
    result = tmd("encode-latents", "--teacher", "tiny-random", "--dry-run", home=synth_home)
    assert result.exit_code == 0 and result.stdout == ""
    assert "8 clips 5x32x32" in result.stderr and "8 prompts through the text encoder" in result.stderr
    assert sorted(p.relative_to(synth_home) for p in synth_home.rglob("*")) == before


def test_only_rank_zero_of_a_launch_commits(home):
    """Data stages need no process group: a non-main rank never commits; rank 0 commits when all is present."""
    from tmdcli.runtime.dist import DistInfo
    from tmdcli.stages.common import Runtime
    from tmdcli.stages.shard_work import finish_when_complete

    staging = Store(home).begin(kind="videos", stage="synth-videos", stage_version=1, config={}, identity_config={})
    names = ["shards/videos-00000.tar", "shards/videos-00001.tar"]
    for name in names:
        staging.write_bytes(name, b"x")
    summarise = lambda: ({"num_items": 0}, {"teacher": "t"})  # noqa: E731
    rank1 = Runtime(console=None, dist=DistInfo(rank=1, world_size=2), worker=1, num_workers=2)
    never = lambda todo: pytest.fail(f"nothing to make, asked for {todo}")  # noqa: E731
    assert finish_when_complete(staging, names, rank1, summarise, make=never, mine=[1]) is None
    rank0 = Runtime(console=None, dist=DistInfo(rank=0, world_size=2), worker=0, num_workers=2)
    artifact = finish_when_complete(staging, names, rank0, summarise, make=never, mine=[0], poll_s=0.01)
    assert artifact is not None and artifact.manifest.facts == {"teacher": "t"}
    assert json.loads((artifact.path / "manifest.json").read_text())["env"]["num_workers"] == 2
