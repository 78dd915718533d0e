"""Run by tests/test_multirank.py under torchrun (2 ranks, gloo, CPU): the FSDP2 checks of tmdcli/runtime/fsdp.py
that need one process group. Rank 0 writes the measured numbers as JSON to argv[1]; the test asserts on them.

1. The frozen teacher sharded per unit gives the same velocity and block features as the unsharded one, and each
   rank holds only its share of the unit parameters.
2. A sharded student trained by runtime/train_loop.run_loop, stopped at a checkpoint and resumed by a fresh sharded
   copy, ends with the same weights as an uninterrupted run (bit for bit), and its gathered state equals the
   single-process training of the same micro-batches up to summation order.
"""

import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

from tmdcli.models import wan
from tmdcli.models.student import StudentConfig, TMDStudent
from tmdcli.models.tiny import build_tiny_components
from tmdcli.runtime import fsdp
from tmdcli.runtime.checkpoint import model_state
from tmdcli.runtime.train_loop import LoopConfig, MetricsLog, make_adamw, run_loop

CPU = torch.device("cpu")


class FixedLoader:
    """Endless seeded micro-batches; rank r of W takes items r, r + W, ... (the LatentLoader's split)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.position = rank, world, 0

    def item(self, k: int) -> dict:
        g = torch.Generator().manual_seed(1000 + k)
        return {"x": torch.randn(1, 16, 3, 4, 4, generator=g), "text": torch.randn(1, 32, 32, generator=g)}

    def batches(self):
        while True:
            self.position += 1  # before the yield: a checkpoint taken after this batch counts it
            yield self.item((self.position - 1) * self.world + self.rank)

    def state_dict(self) -> dict:
        return {"position": self.position, "world_size": self.world}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"] * state["world_size"] // self.world


class Objective(torch.nn.Module):
    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, batch, generator):
        x, text = batch["x"], batch["text"]
        t = torch.rand(1, generator=generator) * 0.9 + 0.05
        y1 = torch.randn(x.shape, generator=generator)
        y = self.student.predict_y(x, t, text, y1)
        loss = (y - x).square().mean()
        return loss, {"loss": loss.detach()}


def make_objective(shard: bool) -> Objective:
    transformer = build_tiny_components(seed=0)["transformer"].requires_grad_(True)
    cfg = StudentConfig(num_outer_steps=2, num_inner_steps=2, num_head_blocks=1, method="tmd", teacher="tiny-random")
    obj = Objective(TMDStudent.from_teacher(transformer, cfg, seed=0).train())
    if shard:
        fsdp.shard(obj, CPU)
    return obj


def train(root: Path, *, shard: bool, rank: int, world: int, iters: int, stop_after: int | None) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    obj = make_objective(shard)
    opt = make_adamw(obj.parameters(), 1e-3)
    cfg = LoopConfig(iters=iters, batch=2, micro_batch=1, save_every=2, log_every=1, stop_after=stop_after, seed=0,
                     keep_checkpoints=5)
    run_loop(cfg, modules={"student": obj}, optimizers={"student": opt}, step_fn=lambda it, b, g: obj(b, g),
             schedule=lambda it: ("student",), loader=FixedLoader(rank, world), ckpt_root=root,
             metrics=MetricsLog(root / "metrics.jsonl", enabled=rank == 0), device=CPU, rank=rank,
             world_size=world, is_main=rank == 0, grad_clip={"student": 1.0})
    return model_state(obj)


def main(out: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    result = {}

    teacher = build_tiny_components(seed=0)["transformer"].requires_grad_(False).eval()
    reference = copy.deepcopy(teacher)
    fsdp.shard(teacher, CPU)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 32, 32, generator=g)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v_a, v_b = wan.velocity(teacher, x, t, text), wan.velocity(reference, x, t, text)
        f_a = wan.block_features(teacher, x, 1000 * t, text, [1, 3])
        f_b = wan.block_features(reference, x, 1000 * t, text, [1, 3])
    result["velocity_max_abs_diff"] = float((v_a - v_b).abs().max())
    result["features_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(f_a, f_b))
    local = sum(p.to_local().numel() for p in teacher.parameters() if hasattr(p, "to_local"))
    full = sum(p.numel() for p in teacher.parameters())
    result["teacher_local_fraction"] = local / full

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        obj_list = [str(tmp)]
        torch.distributed.broadcast_object_list(obj_list, src=0)  # one folder for all ranks (rank 0 writes)
        root = Path(obj_list[0])
        whole = train(root / "whole", shard=True, rank=rank, world=world, iters=4, stop_after=None)
        train(root / "resumed", shard=True, rank=rank, world=world, iters=4, stop_after=2)
        resumed = train(root / "resumed", shard=True, rank=rank, world=world, iters=4, stop_after=None)
        result["resume_bit_exact"] = all(torch.equal(whole[k], resumed[k]) for k in whole)
        result["num_tensors"] = len(whole)
        result["resume_diff"] = {k: float((whole[k] - resumed[k]).abs().max()) for k in whole
                                 if not torch.equal(whole[k], resumed[k])}
        if rank == 0:
            one = train(root / "one", shard=False, rank=0, world=1, iters=4, stop_after=None)
            result["vs_one_process_max_abs_diff"] = max(float((whole[k] - one[k]).abs().max()) for k in whole)
            curves = {}
            for name in ("whole", "one"):
                lines = (root / name / "metrics.jsonl").read_text().splitlines()
                curves[name] = [json.loads(line)["loss"] for line in lines]
            result["loss_curves"] = curves
        torch.distributed.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(result, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
