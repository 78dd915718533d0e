"""Two runs on one home (DESIGN.md 3, one writer; issue 15): shards are claimed, a commit waits for every other writer
of its staging folder and happens once, a single-writer stage refuses a second run, a killed holder frees its locks."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tmdcli.artifacts.locks import LOCK_PREFIX, StagingLock, claimed
from tmdcli.artifacts.store import Store
from tmdcli.cli import app
from tmdcli.stages.shard_work import making

from conftest import write_tiny_latents

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WORDS = ["a cat surfing", "a dog runs in the city", "red car at night", "blue ocean wave", "green video slow motion",
         "the cat on the car"]


def make_prompts(home, n):
    columns = {"id": pa.array(range(n), pa.int64()), "prompt": [WORDS[i % len(WORDS)] for i in range(n)],
               "seed": pa.array([7 * i for i in range(n)], pa.int64())}
    staging = Store(home).begin(kind="prompts", stage="make-prompts", stage_version=1, config={"n": n},
                                identity_config={"n": n})
    with staging.atomic_path("prompts.parquet") as tmp:
        pq.write_table(pa.table(columns), tmp)
    return staging.commit(facts={"num_items": n})


def helper(code: str, *args) -> subprocess.Popen:
    """A small Python process (no torch) that prints a line once it holds what the test needs."""
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read()
    return proc


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


WRITER = """
import sys
from tmdcli.artifacts.store import Store
staging = Store(sys.argv[1]).begin(kind="videos", stage="synth-videos", stage_version=1, config={}, identity_config={})
with staging.atomic_path("shards/b.bin") as tmp:
    tmp.write_bytes(b"half")
    print("ready", flush=True)
    sys.stdin.readline()
    tmp.write_bytes(b"half, then whole")
staging.release()
"""


def test_commit_waits_for_another_process_writing_into_the_staging_folder(home):
    """The commit lists and renames the staging folder only once no other process writes into it: the other's
    half-written temporary file never reaches the manifest, its finished shard does."""
    staging = Store(home).begin(kind="videos", stage="synth-videos", stage_version=1, config={}, identity_config={})
    staging.write_bytes("shards/a.bin", b"a")
    writer = helper(WRITER, home)
    try:
        committed = []
        thread = threading.Thread(target=lambda: committed.append(staging.commit()), daemon=True)
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive() and not committed  # waiting for the writer
        assert [p.name for p in (staging.path / "shards").iterdir() if ".tmp-" in p.name]  # its file is half-written
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.wait(timeout=30) == 0, writer.stderr.read()
        thread.join(timeout=30)
    finally:
        kill(writer)
    artifact = committed[0]
    assert [f["path"] for f in artifact.manifest.files] == ["shards/a.bin", "shards/b.bin"]
    assert Store(home).verify(artifact) == []
    assert not list((home / "videos").glob(".staging-*")) and not list((home / "videos").glob(LOCK_PREFIX + "*"))


CLAIMER = """
import sys
from pathlib import Path
from tmdcli.artifacts.locks import claim
with claim(Path(sys.argv[1]), "shards/videos-00000.tar") as ours:
    print("ready" if ours else "refused", flush=True)
    sys.stdin.readline()
"""


def test_a_shard_claimed_by_a_live_process_is_skipped_and_freed_when_it_is_killed(home):
    staging = Store(home).begin(kind="videos", stage="synth-videos", stage_version=1, config={}, identity_config={})
    name = "shards/videos-00000.tar"
    holder = helper(CLAIMER, staging.path)
    try:
        assert claimed(staging.path, name)
        with making(staging, name) as ours:
            assert not ours  # another process is making it
    finally:
        kill(holder)  # SIGKILL: no cleanup ran, the kernel dropped its lock
    assert not claimed(staging.path, name)
    with making(staging, name) as ours:
        assert ours
    staging.release()


def _cli(*args, home):
    return subprocess.Popen([sys.executable, "-m", "tmdcli", *args, "--home", str(home)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_twice_at_once(args, home, kind):
    """Start the same command twice on one home; both exit 0 with the same artifact, committed once and intact."""
    procs = [_cli(*args, home=home) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    artifacts = Store(home).list(kind)
    assert len(artifacts) == 1
    artifact = artifacts[0]
    assert {out.strip() for out, _ in outs} == {str(artifact.path)}  # both print it: one committed, one joined
    assert Store(home).verify(artifact) == []
    assert not any(".tmp-" in f["path"] or "/." in "/" + f["path"] for f in artifact.manifest.files)
    assert sorted(p.name for p in (home / kind).iterdir()) == [artifact.id]  # no staging folder, no lock left
    return artifact, [err for _, err in outs]


@pytest.mark.slow  # four CLI processes (torch, diffusers, the tiny teacher each): ~40 s CPU
def test_the_same_synth_videos_and_encode_latents_started_twice_commit_once(tmp_path):
    """Issue 15: two identical runs on one home used to commit another run's temporary shard, crash with
    FileNotFoundError, or leave a stale staging folder with duplicate shards."""
    home = tmp_path / "home"
    make_prompts(home, 6)
    synth = ["synth-videos", "--teacher", "tiny-random", "--frames", "5", "--height", "32", "--width", "32",
             "--steps", "2", "--shard-size", "1", "--batch-size", "1"]
    videos, logs = _run_twice_at_once(synth, home, "videos")
    assert videos.manifest.facts["num_shards"] == 6 and videos.manifest.facts["num_items"] == 6
    latents, _ = _run_twice_at_once(["encode-latents", "--teacher", "tiny-random", "--reencode"], home, "latents")
    assert latents.manifest.facts["num_items"] == 6


def _student_id(home, args):
    dry = CliRunner().invoke(app, [*args, "--dry-run", "--home", str(home)])
    assert dry.exit_code == 0, dry.output
    return re.search(r"student-[0-9a-f]{12}", dry.stderr).group(0)


HOLDER = """
import sys
from pathlib import Path
from tmdcli.artifacts.locks import StagingLock
StagingLock(Path(sys.argv[1]), sys.argv[2]).take("pretrain-head")
print("ready", flush=True)
sys.stdin.readline()
"""


def test_a_second_training_run_of_the_same_student_is_refused_until_the_first_dies(home):
    write_tiny_latents(home)
    args = ["pretrain-head", "--teacher", "tiny-random", "--n", "2", "--h", "1", "--batch", "2", "--iters", "1",
            "--num-sample-prompts", "0"]
    student = _student_id(home, args)
    first = helper(HOLDER, home / "student" / f"{LOCK_PREFIX}{student}", student)  # a run that holds it
    try:
        second = CliRunner().invoke(app, [*args, "--home", str(home)])
        assert second.exit_code == 2, second.output
        assert f"{student} is being written by pid {first.pid}" in second.stderr and "hint:" in second.stderr
        assert "Traceback" not in second.output and not Store(home).list("student")
    finally:
        kill(first)  # SIGKILLed: no cleanup ran
    rerun = StagingLock.of(home, "student", student)  # what the rerun takes first: free again (the kernel dropped it)
    rerun.take("pretrain-head")
    assert json.loads((home / "student" / f"{LOCK_PREFIX}{student}").read_text())["pid"] == os.getpid()
    rerun.release()
