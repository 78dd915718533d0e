"""Several ranks for real: FSDP2 on the CPU over gloo, launched as users launch it (`accelerate launch` with
recipes/accelerate/fsdp-cpu.yaml, the CPU twin of fsdp-8gpu.yaml), for `pretrain-head` and `distill` on the
tiny-random teacher, plus the runtime checks of tests/multirank_driver.py under torchrun.

Tolerances: sharded forward == unsharded forward exactly (all-gather copies values); a resumed FSDP2 run ==
an uninterrupted FSDP2 run bit for bit; 2 ranks vs one process accumulating the same 2 micro-batches: per-iteration
loss within rtol 1e-5 and weights within rtol 1e-4 / atol 1e-6 (only the order of float sums differs: FSDP's
reduce-scatter averages the two gradients, one process adds them in sequence).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tmdcli.artifacts.store import Store
from tmdcli.cli import app

from conftest import write_tiny_latents

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "recipes" / "accelerate" / "fsdp-cpu.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, home: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
           "--main_process_port", str(free_port()), "-m", "tmdcli", *map(str, args), "--home", str(home)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def curve(artifact) -> list[tuple[int, str, float]]:
    """Every logged number but timings: (iteration, term, value), e.g. loss, vsd, fake_dsm, grad norms."""
    rows = []
    for line in (artifact.path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        rows += [(record["iteration"], k, float(v)) for k, v in sorted(record.items())
                 if isinstance(v, (int, float)) and k not in ("iteration", "its_per_s", "elapsed_s")]
    return rows


def student_tensors(artifact) -> dict[str, torch.Tensor]:
    """The exported student, loaded the way `tmd sample` loads it (one plain process, no launcher)."""
    from tmdcli.models.student import TMDStudent

    return TMDStudent.load(artifact.path / "export").state_dict()


def assert_same_training(a, b):
    ca, cb = curve(a), curve(b)
    assert [r[:2] for r in ca] == [r[:2] for r in cb] and ca
    torch.testing.assert_close(torch.tensor([r[2] for r in ca], dtype=torch.float64),
                               torch.tensor([r[2] for r in cb], dtype=torch.float64), rtol=1e-5, atol=1e-7)
    ta, tb = student_tensors(a), student_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-6)


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of the worker processes the launcher started (its children carrying RANK)."""
    found = {}
    for task in Path(f"/proc/{launcher.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(pid)
    return found


def test_a_loader_position_maps_to_another_world_size_only_when_no_item_is_skipped_or_repeated():
    from tmdcli.data.loaders import resume_position

    assert resume_position(3, 2, 1, 8) == 6 and resume_position(2, 2, 4, 8) == 1 and resume_position(5, 3, 3, 7) == 5
    with pytest.raises(ValueError, match="cannot continue"):
        resume_position(1, 2, 4, 8)  # 2 items consumed cannot split over 4 ranks
    with pytest.raises(ValueError, match="cannot continue"):
        resume_position(2, 2, 3, 8)  # 2 ranks cut the epoch at 8 items, 3 ranks at 6


def test_the_cpu_launch_config_has_the_gpu_configs_fsdp_settings():
    cpu = yaml.safe_load(CPU_CONFIG.read_text())
    gpu = yaml.safe_load((REPO / "recipes" / "accelerate" / "fsdp-8gpu.yaml").read_text())
    assert cpu["fsdp_config"] == gpu["fsdp_config"] and cpu["distributed_type"] == "FSDP" and cpu["use_cpu"]


@pytest.mark.slow  # 2-rank launches: ~35-130 s on a shared 2-core CPU
def test_fsdp2_runtime_exact_forward_bit_exact_resume_and_one_process_equivalence(tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(REPO / "tests" / "multirank_driver.py"), str(out)], env=ENV,
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["velocity_max_abs_diff"] == 0.0 and r["features_max_abs_diff"] == 0.0  # sharded teacher, exact
    assert 0.45 < r["teacher_local_fraction"] < 0.55  # each rank holds half of it (plus padding, minus leftovers)
    assert r["resume_bit_exact"], r["resume_diff"]
    assert r["vs_one_process_max_abs_diff"] < 1e-6
    torch.testing.assert_close(torch.tensor(r["loss_curves"]["whole"]), torch.tensor(r["loss_curves"]["one"]),
                               rtol=1e-6, atol=0)


@pytest.mark.slow  # 2-rank launches: ~35-130 s on a shared 2-core CPU
def test_pretrain_head_fsdp2_two_ranks_sigkill_then_resume_with_two_and_with_one(tmp_path):
    ref, two, one = tmp_path / "ref", tmp_path / "two", tmp_path / "one"
    for h in (ref, two):
        write_tiny_latents(h)
    args = ["pretrain-head", "--teacher", "tiny-random", "--n", "2", "--h", "1", "--batch", "2", "--iters", "8",
            "--save-every", "2", "--log-every", "1", "--lr", "1e-3", "--num-sample-prompts", "1",
            "--sample-every", "0"]
    first = launch(*args, home=two)
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and first.poll() is None:
        if list((two / "student").glob(".staging-*/checkpoints/iter-0000002")):
            pids = rank_pids(first)
            if 1 in pids:
                os.kill(pids[1], signal.SIGKILL)  # one rank dies; the launcher takes the other down
                killed = pids[1]
                break
        time.sleep(0.02)
    log = first.communicate(timeout=120)[0]
    assert killed is not None and first.returncode != 0, log[-3000:]
    assert Store(two).list("student") == []  # nothing committed by the killed run
    shutil.copytree(two, one)  # the same interrupted run, to be resumed by a single process

    second = launch(*args, home=two)
    log = second.communicate(timeout=600)[0]
    assert second.returncode == 0, log[-3000:]
    assert "resuming from iter-" in log and "2 GPU(s)" in log
    artifact = Store(two).resolve("student:latest")
    assert artifact.manifest.facts["world_size"] == 2
    assert invoke("verify", artifact.id, "--home", two).exit_code == 0
    assert (artifact.path / "samples" / "iter-0000008" / "0.mp4").is_file()  # validation sampled under FSDP2

    assert invoke(*args, "--home", ref).exit_code == 0  # one process accumulating the same 2 micro-batches
    reference = Store(ref).resolve("student:latest")
    assert reference.id == artifact.id
    assert_same_training(artifact, reference)

    resumed = invoke(*args, "--home", one)
    assert resumed.exit_code == 0 and "resuming from iter-" in resumed.output, resumed.output
    assert_same_training(Store(one).resolve("student:latest"), reference)


@pytest.mark.slow  # 2-rank launches: ~35-130 s on a shared 2-core CPU
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_distill_fsdp2_two_ranks_equals_one_process_and_exports_a_plain_student(tmp_path, mode):
    if mode == "lora":
        pytest.importorskip("peft")
    ref, two = tmp_path / "ref", tmp_path / "two"
    write_tiny_latents(ref)
    init = invoke("pretrain-head", "--teacher", "tiny-random", "--n", "2", "--h", "1", "--batch", "2", "--iters", 2,
                  "--num-sample-prompts", 0, "--home", ref)
    assert init.exit_code == 0, init.output
    shutil.copytree(ref, two)
    args = ["distill", "--teacher", "tiny-random", "--n", "2", "--h", "1", "--batch", "2", "--iters", "6",
            "--save-every", "3", "--log-every", "1", "--lr", "1e-3", "--num-sample-prompts", "1"]
    args += ["--lora-rank", "4"] if mode == "lora" else []  # adapters inside FSDP units, frozen bases sharded
    run = launch(*args, home=two)
    log = run.communicate(timeout=600)[0]
    assert run.returncode == 0, log[-3000:]
    artifact = Store(two).resolve("student:latest")
    assert artifact.manifest.stage == "distill" and artifact.manifest.facts["world_size"] == 2
    assert invoke("verify", artifact.id, "--home", two).exit_code == 0
    assert invoke(*args, "--home", ref).exit_code == 0
    reference = Store(ref).resolve("student:latest")
    assert_same_training(artifact, reference)
    if mode == "lora":
        assert not any("lora" in k for k in student_tensors(artifact))  # merged on export
    terms = {(it, k) for it, k, _ in curve(artifact)}
    assert {(1, "vsd"), (2, "fake_dsm"), (6, "vsd")} <= terms  # student at iterations 0 and 5, critics between
