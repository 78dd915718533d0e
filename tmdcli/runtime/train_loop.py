"""The training loop shared by `pretrain-head` and `distill` (STYLE.md 3.8; METHOD.md section 6, D14).

A stage hands over its trainable loss modules (an nn.Module whose forward returns the loss, so DDP/FSDP see one
forward per backward), one optimizer per module, a `step_fn(iteration, batch, generator) -> (loss, terms)` and a
`schedule(iteration) -> names of the modules trained at that iteration` (this is where "student every 5th
iteration" stays visible in the stage). The loop owns everything else:

- gradient accumulation: `batch` (global) = micro_batch x world_size x accumulation steps;
- bf16 autocast on GPU (fp32 master weights in the optimizer), gradient clipping, AdamW steps;
- randomness: micro-batch j of iteration k draws from its own generator seeded by (seed, k, j), where j counts
  micro-batches over all ranks (j = accumulation step x world size + rank). A resumed run draws exactly what an
  uninterrupted one would, and since the loader hands rank r the items r, r + W, ... of the same epoch order, a
  run on W GPUs sees the same samples with the same noise as one GPU accumulating W micro-batches; torch's global
  RNG (dropout) is reseeded from (seed, k, j) before each micro-batch for the same reason;
- checkpoints every `save_every` iterations (runtime/checkpoint.py) holding networks, optimizers, RNG states and
  the data-loader position; a rerun resumes from the newest one; metrics.jsonl is cut back to that iteration;
- a non-finite loss or gradient norm stops the run naming the iteration; the last good checkpoint stays;
- a progress line (iteration, loss terms, it/s, ETA) on stderr, metrics.jsonl, optional TensorBoard or W&B;
- validation every `sample_every` iterations through a stage-supplied callback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from tmdcli.errors import StageError, UsageError
from tmdcli.optional import require
from tmdcli.runtime import checkpoint as ckpt
from tmdcli.runtime.log import check_log_backend  # noqa: F401 (re-exported; lives where plans can import it)

StepFn = Callable[[int, dict, torch.Generator], tuple[torch.Tensor, dict]]


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    iters: int
    batch: int = 64  # global batch (samples per optimizer step over all ranks)
    micro_batch: int = 1  # per GPU per forward
    save_every: int = 500
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    stop_after: int | None = None  # stop (checkpointed) after this iteration; a rerun continues
    seed: int = 0
    keep_checkpoints: int = 2
    autocast_bf16: bool = True  # on CUDA only


@dataclass
class LoopResult:
    iteration: int  # iterations completed
    finished: bool  # reached cfg.iters
    resumed_from: int  # 0 when started fresh
    last_terms: dict
    seconds: float


def accumulation_steps(batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank; the global batch must split evenly."""
    if batch < 1 or micro_batch < 1:
        raise UsageError(f"--batch and --micro-batch must be >= 1, got {batch} and {micro_batch}")
    per_step = micro_batch * world_size
    if batch % per_step:
        raise UsageError(f"--batch {batch} is not a multiple of --micro-batch {micro_batch} x {world_size} GPU(s)",
                         hint=f"use --batch {max(per_step, batch // per_step * per_step)} or change --micro-batch")
    return batch // per_step


def micro_batch_seed(seed: int, iteration: int, micro_batch_index: int) -> int:
    digest = hashlib.sha256(f"tmd-iteration:{int(seed)}:{int(iteration)}:{int(micro_batch_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def global_rng_seed(seed: int, iteration: int, micro_batch_index: int) -> int:
    """Seed of torch's global RNG for one micro-batch: modules that draw from it (the discriminator's dropout) get
    the same masks for micro-batch j whatever the number of processes, and a resumed run the same as an
    uninterrupted one (rng.pt alone would give every rank rank 0's state)."""
    digest = hashlib.sha256(f"tmd-global-rng:{int(seed)}:{int(iteration)}:{int(micro_batch_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def micro_batch_generator(seed: int, iteration: int, micro_batch_index: int, device: torch.device) -> torch.Generator:
    """All randomness of one micro-batch (noise, times, dropout masks) comes from this generator."""
    return torch.Generator(device=device).manual_seed(micro_batch_seed(seed, iteration, micro_batch_index))


def make_adamw(params, lr: float, *, weight_decay: float = 0.01, betas=(0.9, 0.99), eps: float = 1e-8):
    """AdamW with TMD's Table 7 settings; constant learning rate, no warm-up (D14)."""
    params = [p for p in params if p.requires_grad]
    foreach = None if any(p.is_cuda for p in params) else False  # the same kernels every run on CPU
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, foreach=foreach)


def _to_float(value) -> float:
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


class MetricsLog:
    """metrics.jsonl (rank 0), plus TensorBoard or W&B when asked for; cut back to an iteration on resume."""

    def __init__(self, path: Path, *, enabled: bool = True, backend: str = "none", run_config: dict | None = None):
        self.path, self.enabled, self.backend = path, enabled, backend
        self._tb = self._wandb = None
        if not enabled:
            return
        if backend == "tensorboard":
            require("tensorboard", extra="tensorboard", purpose="--log-to tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(path.parent / "tensorboard"))
        elif backend == "wandb":
            wandb = require("wandb", extra="wandb", purpose="--log-to wandb")

            self._wandb = wandb.init(project="tmdcli", dir=str(path.parent), config=run_config or {},
                                     name=path.parent.name, resume="allow", id=path.parent.name[-32:])

    def truncate(self, iteration: int) -> None:
        """Drop records past `iteration` (written after the checkpoint a resumed run starts from)."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["iteration"] <= iteration:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        step = record["iteration"]
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def mean_over_ranks(terms: dict[str, float], world_size: int, device=None) -> dict[str, float]:
    """The iteration's loss terms averaged over all ranks (each rank holds the mean over its own micro-batches), so
    the logged curve is the global batch's, whatever the number of processes."""
    if world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return terms
    keys = sorted(terms)
    values = torch.tensor([terms[k] for k in keys], dtype=torch.float64, device=device)  # NCCL: on the GPU
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return {k: float(v) / world_size for k, v in zip(keys, values.tolist())}


def _format_terms(terms: dict) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in terms.items())


def run_loop(cfg: LoopConfig, *, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             step_fn: StepFn, schedule: Callable[[int], Sequence[str]], loader,
             ckpt_root: Path, metrics: MetricsLog, device: torch.device, accelerator=None, rank: int = 0,
             world_size: int = 1, is_main: bool = True, grad_clip: dict[str, float | None] | None = None,
             validate: Callable[[int], None] | None = None, console=None, desc: str = "train",
             run_identity: str = "") -> LoopResult:
    """Train from the newest checkpoint under `ckpt_root` (or from scratch) to `cfg.iters` or `cfg.stop_after`."""
    from tmdcli.runtime import fsdp
    from tmdcli.runtime.log import Progress

    accum = accumulation_steps(cfg.batch, cfg.micro_batch, world_size)
    sharded = {name: world_size > 1 and fsdp.is_sharded(m) for name, m in modules.items()}
    grad_clip = grad_clip or {}
    start = 0
    latest = ckpt.latest_checkpoint(ckpt_root)
    if latest is not None:
        info = ckpt.load_checkpoint(latest, modules=modules, optimizers=optimizers)
        if run_identity and info.get("run_identity") not in (None, run_identity):
            raise StageError(f"checkpoint {latest} belongs to another run configuration",
                             hint="move the folder away or use a new --name")
        try:
            loader.load_state_dict(info["loader"])
        except ValueError as e:
            raise UsageError(f"cannot resume from {latest}: {e}",
                             hint=f"rerun with the number of processes that wrote it "
                                  f"({info['loader'].get('world_size')}), or start over with a new --name") from None
        start = int(info["iteration"])
        metrics.truncate(start)
        if console is not None:
            console.print(f"resuming from {latest.name} (iteration {start} of {cfg.iters})")
    if latest is None:  # the global RNG (dropout) starts from the seed too; a resume restores its saved state
        torch.manual_seed(micro_batch_seed(cfg.seed, -1, rank))
    last_saved = start
    batches = loader.batches()  # lazily started: it begins at the restored position
    end = cfg.iters if cfg.stop_after is None else min(cfg.iters, cfg.stop_after)
    use_autocast = cfg.autocast_bf16 and device.type == "cuda"
    progress = Progress(cfg.iters, desc, unit="it", enabled=is_main, done=start)
    t_start = time.monotonic()
    window_t, window_its = time.monotonic(), 0
    terms_mean: dict = {}

    def save(iteration: int) -> None:
        nonlocal last_saved
        state = {"loader": loader.state_dict(), "run_identity": run_identity, "terms": terms_mean,
                 "world_size": world_size}
        ckpt.save_checkpoint(ckpt_root, iteration, modules=modules, optimizers=optimizers, state=state,
                             is_main=is_main, keep=cfg.keep_checkpoints)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        last_saved = iteration

    def stop(what: str, iteration: int) -> StageError:
        progress.close()
        where = (f"the last good checkpoint is iteration {last_saved} in {ckpt_root}" if last_saved
                 else "no checkpoint was saved yet")
        return StageError(f"non-finite {what} at iteration {iteration}; training stopped ({where})",
                          hint="lower --lr, check the latents artifact (`tmd verify`), or rerun with TMD_DEBUG=1; "
                               "a rerun of the same command resumes from the last good checkpoint")

    try:
        for it in range(start, end):
            names = list(schedule(it))
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for k in range(accum):
                batch = next(batches)
                generator = micro_batch_generator(cfg.seed, it, k * world_size + rank, device)
                torch.manual_seed(global_rng_seed(cfg.seed, it, k * world_size + rank))
                syncing = k == accum - 1 or accelerator is None or world_size == 1
                no_sync = contextlib.ExitStack()
                if not syncing:
                    for name in names:
                        no_sync.enter_context(fsdp.no_grad_sync(modules[name]) if sharded[name]
                                              else accelerator.no_sync(modules[name]))
                with no_sync, torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
                    loss, terms = step_fn(it, batch, generator)
                if not torch.isfinite(loss.detach()).all():
                    raise stop("loss", it + 1)
                scaled = loss / accum
                if accelerator is not None:
                    accelerator.backward(scaled)
                else:
                    scaled.backward()
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + _to_float(value) / accum
            sums = mean_over_ranks(sums, world_size, device)
            for name in names:
                params = [p for p in modules[name].parameters() if p.grad is not None]
                limit = grad_clip.get(name)
                if sharded[name]:  # FSDP averaged the sharded gradients; the replicated leftovers need it too
                    fsdp.sync_replicated_grads(modules[name])
                    params = [p for p in modules[name].parameters() if p.grad is not None]
                    norm = fsdp.clip_grad_norm(params, limit if limit else float("inf"))
                else:
                    norm = torch.nn.utils.clip_grad_norm_(params, limit if limit else float("inf"))
                if not math.isfinite(float(norm)):
                    raise stop(f"gradient norm of {name}", it + 1)
                sums[f"grad_norm_{name}"] = float(norm)
                optimizers[name].step()
            done = it + 1
            terms_mean = sums
            window_its += 1
            if done % cfg.log_every == 0 or done == end:
                now = time.monotonic()
                record = {"iteration": done, **sums, "its_per_s": window_its / max(now - window_t, 1e-9),
                          "elapsed_s": now - t_start,
                          "lr": {n: optimizers[n].param_groups[0]["lr"] for n in names}}
                metrics.write(record)
                window_t, window_its = now, 0
            progress.update(1, info=_format_terms({k: v for k, v in sums.items() if not k.startswith("grad_")}))
            if done % cfg.save_every == 0 or done == end:
                save(done)
            if validate is not None and ((cfg.sample_every and done % cfg.sample_every == 0) or done == cfg.iters):
                validate(done)
    finally:
        progress.close()
    return LoopResult(iteration=end, finished=end == cfg.iters, resumed_from=start, last_terms=terms_mean,
                      seconds=time.monotonic() - t_start)
