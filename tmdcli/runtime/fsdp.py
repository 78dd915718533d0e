"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the training stages, applied by tmd itself.

Why not accelerate's own FSDP2 wrapping: (1) accelerate 1.16 turns an FSDP launch on the CPU into plain DDP
(`distributed_type` MULTI_CPU), so the FSDP path could never be tested without GPUs; (2) accelerate shards the
objective module as one root, whose own parameters (patch embedding, time/text embedders, output layer, the
student's fusion and r-embedder) are only all-gathered inside the root's forward. Our code calls the networks piece
by piece from many places (the student's backbone and head, the teacher's block features for the discriminator, the
critic step's no-grad student rollout, validation sampling), most of them outside that forward.

So each network is sharded per unit that is *called as a module* (a unit all-gathers its parameters in its own
forward pre-hook, whoever calls it): every transformer block, every other module that owns parameters (patch
embedding, embedder linears, output projection, fusion, r-embedder, discriminator). Each unit is its own FSDP root
with `reshard_after_forward` set explicitly, so it frees its full parameters after every forward. The only
parameters left out are those of modules whose forward the code bypasses (Wan's 2 x D output modulation table) and
0-d gates (fully_shard refuses scalars): they stay replicated and their gradients are averaged over ranks by
`sync_replicated_grads` (what DDP would do). (`register_fsdp_forward_method` would only route methods of an FSDP
module itself; our calls go to submodules and to functions of the networks.)

Consequence: every rank must call the same units in the same order (each call is a collective), so a data-dependent
branch is taken on all ranks or on none (objectives/meanflow.py `_any_rank`).

The launch asks for FSDP2 as for accelerate: `accelerate launch --config_file recipes/accelerate/fsdp-8gpu.yaml`
(or fsdp-cpu.yaml) exports ACCELERATE_USE_FSDP=true and FSDP_VERSION=2 to every rank; a plain `torchrun` can set
the same two variables. (`accelerate launch --cpu` with an FSDP config starts one plain process instead.)
"""

from __future__ import annotations

import contextlib
import os

import torch

from tmdcli.errors import UsageError

# Modules sharded as one unit (their forward is always called as a module): the Wan DiT block (the unit of the
# launch configs' TRANSFORMER_BASED_WRAP), the student's new modules and the discriminator.
UNIT_CLASSES = ("WanTransformerBlock", "GatedFusion", "ConcatFusion", "DifferenceEmbedder", "Discriminator")
# Containers whose forward our code bypasses (it calls their children): their own parameters stay replicated.
BYPASSED_CLASSES = ("WanTransformer3DModel", "StudentExtras", "TMDStudent")


def fsdp2_requested() -> bool:
    """True when the launch asks for FSDP (accelerate exports ACCELERATE_USE_FSDP to every rank); FSDP1 exits 2."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true"):
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UsageError(f"the launch config asks for FSDP version {version}; tmd supports FSDP2 only",
                         hint="set `fsdp_version: 2` in the accelerate config (see recipes/accelerate/fsdp-8gpu.yaml)")
    return True


def reshard_after_forward() -> bool:
    """The config's fsdp_reshard_after_forward (true = FULL_SHARD, false = SHARD_GRAD_OP); default true."""
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("1", "true", "full_shard")


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (torch.distributed.get_world_size(),))


def shard_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules `shard` turns into FSDP units, outermost first, never nested (pure: nothing is changed)."""
    units: list[torch.nn.Module] = []

    def visit(m: torch.nn.Module) -> None:
        name = type(m).__name__
        owns = any(True for _ in m.parameters(recurse=False))
        if name in UNIT_CLASSES or (owns and name not in BYPASSED_CLASSES and m is not module):
            if any(True for _ in m.parameters()):
                units.append(m)
            return
        for child in m.children():
            visit(child)

    visit(module)
    return units


def shard(module: torch.nn.Module, device: torch.device, *, reshard: bool | None = None) -> torch.nn.Module:
    """Apply fully_shard to every unit of `module` in place (a collective: every rank calls it with the same model).

    Call it once per network, after its weights and `requires_grad` flags are final and before its optimizer is
    made (fully_shard replaces the parameters with sharded DTensor parameters)."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device)
    keep = reshard_after_forward() if reshard is None else reshard
    for unit in shard_units(module):
        scalars = {p for p in unit.parameters() if p.dim() == 0}  # fully_shard cannot split 0-d tensors (gates)
        fully_shard(unit, mesh=mesh, reshard_after_forward=keep, ignored_params=scalars or None)
    return module


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def replicated_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Trained parameters FSDP does not manage (left out of every unit): their gradients need an all-reduce."""
    from torch.distributed.tensor import DTensor

    return [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]


def sync_replicated_grads(module: torch.nn.Module) -> None:
    """Average the gradients of the replicated parameters over ranks (the reduction DDP does; FSDP's
    reduce-scatter averages the sharded ones). Every rank runs the same graph, so a gradient is missing (None: the
    optimizer skips it, as in one process) on all ranks or on none."""
    world = torch.distributed.get_world_size()
    for p in replicated_params(module):
        if p.grad is None:
            continue
        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
        p.grad.div_(world)


@contextlib.contextmanager
def no_grad_sync(module: torch.nn.Module):
    """Accumulate gradients locally (no reduce-scatter) for the micro-batches before the last one."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_requires_gradient_sync(True, recurse=False)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of the gradients of a partly sharded network, then clip to `max_norm` (the arithmetic of
    torch.nn.utils.clip_grad_norm_, which cannot mix DTensor and plain gradients). Sharded gradients contribute
    their local shard's squared norm summed over ranks; replicated ones count once."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")  # NCCL reduces GPU tensors only
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    plain = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        if isinstance(g, DTensor):
            sharded += g.to_local().detach().double().pow(2).sum()
        else:
            plain += g.detach().double().pow(2).sum()
    torch.distributed.all_reduce(sharded, op=torch.distributed.ReduceOp.SUM)
    total = float((sharded + plain).sqrt())
    if max_norm != float("inf") and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(coef)
    return total
