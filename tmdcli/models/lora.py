"""LoRA mode of `tmd distill` (`--lora-rank R`, `--lora-targets`): low-rank adapters through PEFT on the linears of
the Wan blocks of the student and of the fake score, so 14B Stage 2 fits one 8 x 80 GB node (README "Does it fit?").

What trains in LoRA mode: the adapters (A: r x in, B: out x r; B starts at zero, so the student starts exactly as
its init), the student's new flow-head modules (fusion, r-embedder: fully), and the discriminator (fully). The
transformers' own weights are frozen. The export merges the adapters, `W + (alpha / r) B A`, into a plain student
that `tmd sample` loads without PEFT; checkpoints keep base weights and adapters apart, so a resume continues the
adapters and their AdamW state.

PEFT is optional (`pip install 'tmdcli[lora]'`): its import goes through tmdcli.optional.
"""

from __future__ import annotations

from tmdcli.errors import UsageError  # no torch at import time: the --dry-run estimate reads BLOCK_LINEARS

# The linears of one diffusers WanTransformerBlock (self-attention, cross-attention, FFN).
BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
# Attention q/k/v/o (self and cross) and both FFN linears: every linear of a block.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
ADAPTER = "default"


def parse_targets(text: str | None) -> tuple[str, ...]:
    """`--lora-targets a,b` -> names matched as module-name suffixes within each block (PEFT's rule); exit 2 for
    a name that matches no block linear."""
    if not text:
        return DEFAULT_TARGETS
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in targets if not matched_linears((t,))]
    if not targets or unknown:
        raise UsageError(f"--lora-targets {text!r}: {', '.join(unknown) or 'empty'} matches no linear of a Wan block",
                         hint=f"use names (or suffixes) of {', '.join(BLOCK_LINEARS)}")
    return targets


def matched_linears(targets) -> tuple[str, ...]:
    """The block linears a target list adapts (suffix match, as PEFT's target_modules list does)."""
    return tuple(n for n in BLOCK_LINEARS if any(n == t or n.endswith("." + t) for t in targets))


def check_available() -> None:
    from tmdcli.optional import check

    check("peft", extra="lora", purpose="--lora-rank (LoRA adapters)")


def add_lora(transformer: torch.nn.Module, rank: int, targets, *, seed: int) -> torch.nn.Module:
    """Inject LoRA adapters (alpha = r, so the merge scale is 1) into the blocks of a Wan transformer in place and
    freeze everything else in it. The A matrices are drawn from `seed` (every rank must hold the same weights)."""
    import torch

    from tmdcli.optional import require

    peft = require("peft", extra="lora", purpose="--lora-rank (LoRA adapters)")
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), lora_dropout=0.0,
                             init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, transformer, adapter_name=ADAPTER)
    for name, p in transformer.named_parameters():
        p.requires_grad_(".lora_" in name)
    return transformer


def lora_param_count(shape_dim: int, ffn_dim: int, num_blocks: int, rank: int, targets) -> int:
    """Adapter parameters of one transformer: r x (in + out) per adapted linear (no torch needed)."""
    sizes = {"attn": (shape_dim, shape_dim), "ffn.net.0.proj": (shape_dim, ffn_dim), "ffn.net.2": (ffn_dim, shape_dim)}
    total = 0
    for name in matched_linears(targets):
        n_in, n_out = sizes.get(name, sizes["attn"])
        total += rank * (n_in + n_out)
    return num_blocks * total


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float = 1.0) -> dict[str, torch.Tensor]:
    """A plain state dict from one with injected adapters (pure): `X.base_layer.weight + scaling B A` becomes
    `X.weight`, `X.base_layer.bias` becomes `X.bias`, the adapter tensors go (LoRA, Hu et al. 2021, Eq. 3)."""
    out = {}
    for key, value in state.items():
        if f".lora_A.{ADAPTER}." in key or f".lora_B.{ADAPTER}." in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        prefix, leaf = key.split(".base_layer.")
        if leaf == "weight" and f"{prefix}.lora_A.{ADAPTER}.weight" in state:
            a = state[f"{prefix}.lora_A.{ADAPTER}.weight"].double()
            b = state[f"{prefix}.lora_B.{ADAPTER}.weight"].double()
            value = (value.double() + scaling * (b @ a)).to(value.dtype)
        out[f"{prefix}.{leaf}"] = value
    return out


def has_lora(state: dict) -> bool:
    return any(f".lora_A.{ADAPTER}." in k for k in state)
