"""Resumable training state: one folder per saved iteration, written whole or not at all.

    <root>/iter-0000200/
        model-<name>.safetensors   full (gathered) state of each trained network
        optim-<name>.pt            its optimizer state (tensors and plain values only: loads with weights_only=True)
        rng.pt                     global torch RNG states (CPU and CUDA), for modules that draw from them (dropout)
        state.json                 iteration, data-loader position, last metrics, and the run's identity

A checkpoint is written into `iter-XXXXXXX.partial-<pid>` and renamed into place once complete, so a run killed at any
moment leaves either the previous checkpoint or the new one. Rank 0 writes; every rank reads. The state dicts go
through torch.distributed.checkpoint's helpers, which gather DDP and FSDP2 parameters into full tensors by their
fully qualified names, so a checkpoint saved under one launch loads under another (world size changes the loader
split, which the loader refuses explicitly).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "tmdcli.train-checkpoint/1"
_NAME = re.compile(r"^iter-(\d{7})$")


def checkpoint_name(iteration: int) -> str:
    return f"iter-{iteration:07d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first (partial folders are ignored)."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _options(full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Full (gathered) state dicts need a process group; a single process already holds full tensors.
    return StateDictOptions(full_state_dict=full and _distributed(), cpu_offload=_distributed())


def model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module, options=_options(True))
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
            for k, v in state.items()}


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options(True))


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(root: Path, iteration: int, *, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], state: dict, is_main: bool = True,
                    keep: int = 2) -> Path:
    """Gather and write one checkpoint (collective under DDP/FSDP: every rank must call it); prune to `keep`."""
    from safetensors.torch import save_file

    tensors = {name: model_state(module) for name, module in modules.items()}
    optims = {name: optimizer_state(modules[name], opt) for name, opt in optimizers.items()}
    final = root / checkpoint_name(iteration)
    if not is_main:
        return final
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f"{final.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for name, sd in tensors.items():
        save_file(sd, str(partial / f"model-{name}.safetensors"))
    for name, sd in optims.items():
        torch.save(sd, partial / f"optim-{name}.pt")
    torch.save(rng_state(), partial / "rng.pt")
    info = {"format": CHECKPOINT_FORMAT, "iteration": iteration, **state}
    (partial / "state.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    for path in partial.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # the same iteration saved again after a resume: replace it (same content by construction)
        shutil.rmtree(final)
    os.replace(partial, final)
    prune_checkpoints(root, keep)
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and leftovers of interrupted writes."""
    for path in root.glob("iter-*.partial-*"):
        shutil.rmtree(path, ignore_errors=True)
    for _, path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def read_state(folder: Path) -> dict:
    info = json.loads((folder / "state.json").read_text())
    if info.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{folder}: unknown checkpoint format {info.get('format')!r}")
    return info


def load_checkpoint(folder: Path, *, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Restore networks, optimizers and RNG states from `folder`; returns its state.json."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    info = read_state(folder)
    for name, module in modules.items():
        sd = load_file(str(folder / f"model-{name}.safetensors"))
        set_model_state_dict(module, sd, options=_options(True))
    for name, opt in optimizers.items():
        sd = torch.load(folder / f"optim-{name}.pt", map_location="cpu", weights_only=True)
        set_optimizer_state_dict(modules[name], opt, sd, options=_options(True))
    rng = torch.load(folder / "rng.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return info
