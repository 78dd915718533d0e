"""The student's new modules: the gated inner-flow fusion layer and the (s - r) time embedder (TMD App. A.1;
METHOD.md 2.2, 2.3, decisions D1, D10, D15). Both are exactly inert at init, so the student starts as the teacher.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class GatedFusion(nn.Module):
    """`h = m + sigmoid(beta) * gate(s) * MLP(AdaLN_s(PatchEmbed(y_s)))` (METHOD.md 2.3, D1).

    The AdaLN re-uses the FFN shift/scale rows (3, 4) of the teacher's `timestep_proj(s)`; the per-feature gate is a
    zero-initialised linear map of SiLU(temb(s)), so at init `h == m` exactly while the gate still receives gradient.
    """

    def __init__(self, dim: int, mlp_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.mlp_in = nn.Linear(dim, mlp_dim)
        self.mlp_out = nn.Linear(mlp_dim, dim)
        self.gate_lin = nn.Linear(dim, dim)
        self.beta = nn.Parameter(torch.zeros(()))
        nn.init.zeros_(self.gate_lin.weight)
        nn.init.zeros_(self.gate_lin.bias)

    def forward(self, m: torch.Tensor, e: torch.Tensor, temb_s: torch.Tensor, tproj_s: torch.Tensor) -> torch.Tensor:
        """m, e: (B, N, D) backbone features and patch-embedded y_s; temb_s (B, D); tproj_s (B, 6, D)."""
        dtype = self.mlp_in.weight.dtype
        shift, scale = (self.scale_shift_table.float() + tproj_s[:, 3:5].float()).chunk(2, dim=1)
        x = self.norm(e.float()) * (1 + scale) + shift
        x = self.mlp_out(nn.functional.gelu(self.mlp_in(x.to(dtype)), approximate="tanh"))
        gate = self.gate_lin(nn.functional.silu(temb_s.to(dtype)))[:, None, :]
        delta = torch.sigmoid(self.beta) * gate * x
        return (m.float() + delta.float()).type_as(m)  # fp32 residual add, as in Wan's blocks


class ConcatFusion(nn.Module):
    """Ablation fusion `Linear(2D -> D)([m, PatchEmbed(y_s)])` (TMD App. B.3): identity on m, N(0, 0.01^2) on y_s.

    Not exact at init (the y_s weights are small but non-zero), as in the paper.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, :dim].copy_(torch.eye(dim))
            self.proj.weight[:, dim:].normal_(0.0, 0.01)
            self.proj.bias.zero_()

    def forward(self, m, e, temb_s, tproj_s):
        dtype = self.proj.weight.dtype
        return self.proj(torch.cat([m, e], dim=-1).to(dtype)).type_as(m)


class DifferenceEmbedder(nn.Module):
    """Time embedding of s - r with the teacher's time-path structure, zero output at init (App. A.1; D15).

    Zeroed: `time_embedder.linear_2` and `time_proj` (weight and bias); `linear_1` keeps its random init, so
    `linear_2` receives gradient at once through the output-layer modulation and the rest follows after one step.
    """

    def __init__(self, dim: int, freq_dim: int):
        super().__init__()
        self.timesteps_proj = Timesteps(num_channels=freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(in_channels=freq_dim, time_embed_dim=dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, 6 * dim)
        for layer in (self.time_embedder.linear_2, self.time_proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, d1000: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """d1000 = 1000 (s - r), shape (B,). Returns (remb (B, D), rproj (B, 6, D)) in `like`'s dtype."""
        freq = self.timesteps_proj(d1000).to(self.time_embedder.linear_1.weight.dtype)
        remb = self.time_embedder(freq)
        rproj = self.time_proj(self.act_fn(remb)).unflatten(1, (6, -1))
        return remb.type_as(like), rproj.type_as(like)


class StudentExtras(ModelMixin, ConfigMixin):
    """The new parameters of a TMD student, kept outside the diffusers transformer (WAN.md 7.4) so the teacher
    weights load unchanged and a student checkpoint is a teacher-format transformer plus this small module."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, dim: int, freq_dim: int = 256, mlp_dim: int | None = None, fusion_type: str = "gated",
                 eps: float = 1e-6):
        super().__init__()
        if fusion_type == "gated":
            self.fusion = GatedFusion(dim, mlp_dim or dim, eps=eps)
        elif fusion_type == "concat":
            self.fusion = ConcatFusion(dim)
        else:
            raise ValueError(f"unknown fusion {fusion_type!r}; expected 'gated' or 'concat'")
        self.r_embedder = DifferenceEmbedder(dim, freq_dim)


def init_extras_for(transformer, *, fusion: str = "gated", mlp_dim: int | None = None, seed: int = 0,
                    ) -> StudentExtras:
    """Build the new modules for a Wan transformer with a fixed seed (fp32; they cast their inputs)."""
    cfg = transformer.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    with torch.random.fork_rng(devices=[]):  # built on the CPU: the global CUDA RNG is untouched
        torch.manual_seed(seed)
        extras = StudentExtras(dim=dim, freq_dim=cfg.freq_dim, mlp_dim=mlp_dim or cfg.ffn_dim, fusion_type=fusion,
                               eps=cfg.eps)
    return extras.to(next(transformer.parameters()).device)
