"""The TMD student: the teacher's transformer split into a main backbone and a recurrent flow head (TMD Sec. 3,
Fig. 2, App. A.1; METHOD.md section 2; WAN.md section 7).

backbone = patch embedding + condition embedding + blocks [0, L-H)      -> m, once per outer step
head     = fusion(m, PatchEmbed(y_s), s) + blocks [L-H, L) + output layer, conditioned on temb(s) + remb(s - r)
u        = y1 - head  (TMD Eq. 14, `paper`)  or  (y_s - head) / s  (`consistent`, D19): config.u_param
f        = y_s - (s - r) u                                                 (flow map s -> r; sign decision D4)

The student wraps the teacher's transformer instance: no weight is copied.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tmdcli.models import wan
from tmdcli.models.fusion import StudentExtras, init_extras_for
from tmdcli.objectives.grids import effective_nfe, inner_grid, outer_grid
from tmdcli.objectives.u_param import DEFAULT_U_PARAM, U_PARAMS, stored_u_param

STUDENT_FORMAT = "tmdcli.student/1"


@dataclass(frozen=True, kw_only=True)
class StudentConfig:
    """What defines a TMD student (names follow STYLE.md 3.4; paper symbols in the comments)."""

    num_outer_steps: int = 2  # M
    num_inner_steps: int = 2  # N
    num_head_blocks: int = 5  # H
    outer_gamma: float = 10.0  # gamma_t of the outer grid
    inner_gamma: float = 10.0  # gamma_s of the inner grid
    fusion: str = "gated"
    u_param: str = DEFAULT_U_PARAM  # how head becomes the average velocity u: "paper" (Eq. 14) or "consistent" (D19)
    method: str = "tmd"  # "tmd" (backbone + flow head) or "dmd2v" (plain few-step student, N = 1 rollout)
    teacher: str = ""  # registry name or folder of the teacher whose text encoder and VAE decode this student
    extra: dict = field(default_factory=dict)

    def validate(self, num_blocks: int) -> None:
        if self.num_outer_steps < 1:
            raise ValueError(f"M (outer steps) must be >= 1, got {self.num_outer_steps}")
        if self.num_inner_steps < 1:
            raise ValueError(f"N (inner steps) must be >= 1, got {self.num_inner_steps}")
        if self.u_param not in U_PARAMS:
            raise ValueError(f"u_param must be one of {', '.join(U_PARAMS)}, got {self.u_param!r}")
        if not 1 <= self.num_head_blocks < num_blocks:
            raise ValueError(f"H (head blocks) must satisfy 1 <= H < L = {num_blocks}, got {self.num_head_blocks}")

    def outer_grid(self) -> list[float]:
        return outer_grid(self.num_outer_steps, self.outer_gamma)

    def inner_grid(self) -> list[float]:
        return inner_grid(self.num_inner_steps, self.inner_gamma)


class TMDStudent(nn.Module):
    """Backbone + flow head over one Wan transformer. Only `backbone()` and `head()` are part of the method."""

    def __init__(self, transformer, extras: StudentExtras, config: StudentConfig):
        super().__init__()
        config.validate(len(transformer.blocks))
        self.transformer = transformer
        self.extras = extras
        self.config = config
        self.checkpointing = False  # activation checkpointing per block (set from the runtime, not the model)

    # --- structure ---------------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.transformer.blocks)

    @property
    def num_backbone_blocks(self) -> int:
        return self.num_blocks - self.config.num_head_blocks

    @property
    def effective_nfe(self) -> float:
        c = self.config
        if c.method == "dmd2v":  # one full forward per outer step (TMD Eq. 16: baselines count M)
            return float(c.num_outer_steps)
        return effective_nfe(c.num_outer_steps, c.num_inner_steps, c.num_head_blocks, self.num_blocks)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    # --- the method ----------------------------------------------------------------------------------------------
    def backbone(self, x_t: torch.Tensor, t: torch.Tensor, text_raw: torch.Tensor) -> wan.BackboneOut:
        """m = m_theta(x_{t_i}, t_i, c): run once per outer step. t: (B,) in [0, 1]."""
        t1000 = 1000.0 * t.to(torch.float64)
        return wan.backbone_forward(self.transformer, x_t.to(self.dtype), t1000.float(), text_raw.to(self.dtype),
                                    self.num_backbone_blocks, checkpointing=self.checkpointing)

    def head(self, y_s: torch.Tensor, s: torch.Tensor, r: torch.Tensor, feats: wan.BackboneOut) -> torch.Tensor:
        """head_theta(y_s, s, r; m, c) (TMD Eqs. 12-14): latent-shaped, teacher-velocity-like output."""
        tr = self.transformer
        s64, r64 = s.to(torch.float64), r.to(torch.float64)
        temb_s, tproj_s = wan.time_embedding(tr, (1000.0 * s64).float(), like=feats.text)
        remb, rproj = self.extras.r_embedder((1000.0 * (s64 - r64)).float(), like=feats.text)
        e = wan.patch_tokens(tr, y_s.to(self.dtype))
        h = self.extras.fusion(feats.m, e, temb_s, tproj_s)
        h = wan.run_blocks(tr, tr.blocks[self.num_backbone_blocks:], h, feats.text, tproj_s + rproj,
                           feats.rotary_emb, checkpointing=self.checkpointing)
        return wan.output_layer(tr, h, temb_s + remb, feats.grid)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, text_raw: torch.Tensor) -> torch.Tensor:
        """The whole network's velocity v(x_t, t) (all L blocks, output layer at temb(t)): the DMD2-v student."""
        t1000 = (1000.0 * t.to(torch.float64)).float()
        feats = wan.backbone_forward(self.transformer, x_t.to(self.dtype), t1000, text_raw.to(self.dtype),
                                     self.num_blocks, checkpointing=self.checkpointing)
        return wan.output_layer(self.transformer, feats.m, feats.temb, feats.grid)

    def predict_y(self, x_t: torch.Tensor, t: torch.Tensor, text_raw: torch.Tensor, y1: torch.Tensor, *,
                  rollout: bool = True, inner_grid: list[float] | None = None,
                  head_time: torch.Tensor | None = None) -> torch.Tensor:
        """y_hat for one outer step: one backbone pass, then the N-step inner flow from y1 (TMD Alg. 1).

        rollout=False detaches y between inner steps (gradients reach only the last step; Fig. 7 ablation).
        `inner_grid` and `head_time` are test switches (METHOD.md 11.1: grid [0, 1], head fed t_i instead of s).
        A DMD2-v student returns its velocity (Eq. 17 parametrisation: x_hat = x_t - t v).
        """
        from tmdcli.sampler import inner_flow

        if self.config.method == "dmd2v":
            return self.velocity(x_t, t, text_raw).float()
        feats = self.backbone(x_t, t, text_raw)

        def head_fn(y, s, r):
            return self.head(y, s if head_time is None else head_time, r, feats).float()

        return inner_flow(head_fn, y1, self.config.inner_grid() if inner_grid is None else inner_grid,
                          u_param=self.config.u_param, detach_between_steps=not rollout)

    # --- persistence -------------------------------------------------------------------------------------------
    def save(self, folder: str | Path, *, metadata: dict | None = None,
             state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write `transformer/` (diffusers layout), `extras/` and `student.json`; loads without the teacher.

        `state` (keys `transformer.*`, `extras.*`) replaces this module's own tensors: a training run passes the
        full state gathered from its (possibly sharded) copy, so only rank 0 needs to call this.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in (state or self.state_dict()).items()}
        for part, model in (("transformer", self.transformer), ("extras", self.extras)):
            sub = folder / part
            sub.mkdir(parents=True, exist_ok=True)
            model.save_config(sub)
            prefix = part + "."
            tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            save_file(tensors, str(sub / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        info = {"format": STUDENT_FORMAT, "config": asdict(self.config), "num_blocks": self.num_blocks,
                "effective_nfe": self.effective_nfe, "outer_grid": self.config.outer_grid(),
                "inner_grid": self.config.inner_grid(), **(metadata or {})}
        (folder / "student.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "TMDStudent":
        from diffusers import WanTransformer3DModel

        folder = Path(folder)
        info = read_student_info(folder)
        transformer = WanTransformer3DModel.from_pretrained(folder / "transformer", dtype=dtype,
                                                            local_files_only=True)
        wan.float32_rope(transformer)
        extras = StudentExtras.from_pretrained(folder / "extras", local_files_only=True)
        config = StudentConfig(**student_config_fields(info))
        student = cls(transformer.to(device).eval(), extras.to(device).eval(), config)
        _own_memory(student)
        return student

    @classmethod
    def from_teacher(cls, transformer, config: StudentConfig, *, seed: int = 0) -> "TMDStudent":
        """Wrap a teacher transformer (no copy) and add freshly initialised, inert new modules."""
        config.validate(len(transformer.blocks))
        return cls(transformer, init_extras_for(transformer, fusion=config.fusion, seed=seed), config)


def _own_memory(module: nn.Module) -> None:
    """Copy CPU parameters out of the memory-mapped safetensors file into ordinary allocations.

    Mapped tensors can be aligned differently, which sends CPU kernels down other reduction orders: without this
    a loaded student differs from the saved one in the last bit. It also frees the file for deletion."""
    with torch.no_grad():
        for p in module.parameters():
            if p.device.type == "cpu":
                p.data = p.data.clone()


def student_config_fields(info: dict) -> dict:
    """StudentConfig fields from student.json (a pre-D19 student, with no `u_param`, loads as `paper`)."""
    return {**info["config"], "u_param": stored_u_param(info["config"])}


def read_student_info(folder: str | Path) -> dict:
    path = Path(folder) / "student.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a tmdcli student folder")
    info = json.loads(path.read_text())
    if info.get("format") != STUDENT_FORMAT:
        raise ValueError(f"{path}: unknown student format {info.get('format')!r} (expected {STUDENT_FORMAT})")
    return info
