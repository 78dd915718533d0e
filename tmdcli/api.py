"""Python API: load a student artifact or a teacher by name and turn prompts into videos.

    from tmdcli.api import load_generator
    gen = load_generator("toy")                     # a teacher name, a student reference, or None (newest student)
    out = gen.generate(["a red circle moving left on a gray background"], seeds=[0])
    gen.write_mp4(out, ["clip.mp4"]); print(out.effective_nfe, out.timings)

The text encoder and the VAE stay resident across calls. `tmd sample` is a thin shell over this module. Speed
options (decoder, VAE dtype, compile, attention backend, CUDA graphs): `load_generator(..., speed=SpeedOptions(...))`
with tmdcli.runtime.speed.SpeedOptions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tmdcli.errors import ArtifactError, UsageError
from tmdcli.registry import REGISTRY, TeacherEntry, resolve_teacher, teacher_defaults

STUDENT_EXPORT_DIR = "export"  # inside a student artifact: transformer/, extras/, student.json


@dataclass(frozen=True)
class ModelRef:
    """What `--model` resolved to, before anything heavy is loaded."""

    kind: str  # "teacher" or "student"
    label: str  # what to print
    teacher: TeacherEntry  # the teacher (for a student: the one whose text encoder and VAE it uses)
    student_dir: Path | None = None
    student_info: dict = field(default_factory=dict)
    artifact_id: str | None = None


def resolve_model(model: str | None, home: str | Path) -> ModelRef:
    """A teacher name/folder, a student artifact reference, or None for the newest student in `home`."""
    from tmdcli.artifacts.store import Store

    store = Store(home)
    if model is None:
        students = store.list("student")
        if not students:
            raise ArtifactError(f"no student in {Path(home).resolve()} and no --model given",
                                hint="make one with `tmd pretrain-head --n 2 --h 5` (then `tmd distill`), or sample "
                                     "a teacher directly, e.g. `tmd sample \"a cat surfing\" --model tiny-random`")
        return _student_ref(students[0])
    if model in REGISTRY:
        return ModelRef(kind="teacher", label=model, teacher=REGISTRY[model])
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "manifest.json").is_file():
        return ModelRef(kind="teacher", label=str(path), teacher=resolve_teacher(str(path)))
    try:
        artifact = store.resolve(model, kind="student")
    except ArtifactError as exc:
        raise ArtifactError(f"--model {model!r} is neither a teacher ({', '.join(REGISTRY)}, or a folder in "
                            f"diffusers Wan layout) nor a student artifact in {Path(home).resolve()}",
                            hint=exc.hint) from exc
    return _student_ref(artifact)


def _student_ref(artifact) -> ModelRef:
    folder = artifact.path / STUDENT_EXPORT_DIR
    info_path = folder / "student.json"
    if not info_path.is_file():
        raise ArtifactError(f"student artifact {artifact.id} has no {STUDENT_EXPORT_DIR}/student.json",
                            hint=f"check it with `tmd verify {artifact.id}`")
    info = json.loads(info_path.read_text())
    teacher = resolve_teacher(info["config"]["teacher"])
    return ModelRef(kind="student", label=artifact.id, teacher=teacher, student_dir=folder, student_info=info,
                    artifact_id=artifact.id)


@dataclass
class Timings:
    """Wall time of one generate() call, split as the paper's compute accounting needs it."""

    text_s: float = 0.0
    transformer_s: float = 0.0
    vae_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.text_s + self.transformer_s + self.vae_s

    def __str__(self) -> str:
        return (f"text {self.text_s:.3f} s | transformer {self.transformer_s:.3f} s | VAE decode {self.vae_s:.3f} s"
                f" | total {self.total_s:.3f} s")


@dataclass
class Generation:
    videos: "object"  # torch.Tensor (B, 3, F, H, W) float32 in [-1, 1], on the CPU
    latents: "object"  # torch.Tensor (B, C, T, H, W) float32, on the CPU
    prompts: list[str]
    seeds: list[int]
    effective_nfe: float
    timings: Timings


class VideoGenerator:
    """A student (Algorithm 1) or a teacher (its own CFG sampler) with resident text encoder and VAE."""

    def __init__(self, ref: ModelRef, *, device: str = "auto", dtype: str = "auto",
                 inner_steps: int | None = None, init_student: tuple[int, int, int] | None = None,
                 num_steps: int | None = None, guidance_scale: float | None = None, speed=None):
        from tmdcli.models.student import StudentConfig, TMDStudent
        from tmdcli.registry import load_teacher, resolve_device
        from tmdcli.runtime import speed as speed_options

        self.ref = ref
        self.speed = speed_options.check(speed or speed_options.SpeedOptions())
        speed_options.check_runtime(self.speed, resolve_device(device))  # before any weights are loaded
        parts = ("vae", "text_encoder") if ref.kind == "student" else ("transformer", "vae", "text_encoder")
        self.teacher = load_teacher(str(ref.teacher.folder or ref.teacher.name), device=device, dtype=dtype,
                                    parts=parts)
        self.defaults = self.teacher.defaults
        self.student = None
        if ref.kind == "student":
            self.student = TMDStudent.load(ref.student_dir, device=self.teacher.device, dtype=self.teacher.dtype)
            if inner_steps is not None:  # e.g. N1 at inference after N4 training (TMD Fig. 14)
                from dataclasses import replace
                self.student.config = replace(self.student.config, num_inner_steps=inner_steps)
        elif init_student is not None:
            m, n, h = init_student
            config = StudentConfig(num_outer_steps=m, num_inner_steps=n, num_head_blocks=h, teacher=ref.teacher.name)
            try:
                self.student = TMDStudent.from_teacher(self.teacher.transformer, config)
            except ValueError as exc:
                raise UsageError(str(exc), hint=f"{ref.teacher.name} has L = {self.teacher.num_blocks} blocks") from exc
            self.student.to(self.teacher.device)
        self.num_steps = num_steps or self.defaults.num_steps
        self.guidance_scale = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        sampled = self.student.transformer if self.student is not None else self.teacher.transformer
        speed_options.apply_to_transformer(sampled, self.speed)
        self.decode = speed_options.make_decoder(self.teacher.vae, self.speed, self.teacher.device)

    @property
    def effective_nfe(self) -> float:
        if self.student is not None:
            return self.student.effective_nfe
        return self.num_steps * (2 if self.guidance_scale != 1.0 else 1)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None) -> Generation:
        """Videos for `prompts`, sample b drawn from seed `seeds[b]` (independent of batching)."""
        import torch

        from tmdcli.sampler import generators_for, randn_per_sample, sample_teacher, sample_tmd

        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        d = self.defaults
        shape = self.teacher.latent_shape(num_frames or d.num_frames, height or d.height, width or d.width)
        timings = Timings()
        device = self.teacher.device

        def now() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter()

        t0 = now()
        text = self.teacher.encode_prompts(list(prompts))
        t1 = now()
        generators = generators_for(seeds)
        noise = randn_per_sample(shape, generators, device=device)
        if self.student is not None:
            cfg = self.student.config
            latents = sample_tmd(self.student, noise, text, outer_grid=cfg.outer_grid(), inner_grid=cfg.inner_grid(),
                                 generators=generators)
        else:
            neg = self.teacher.negative_embedding(len(prompts))
            latents = sample_teacher(
                lambda x, t: self.teacher.velocity(x, t, text, text_neg=neg, guidance_scale=self.guidance_scale),
                noise, num_steps=self.num_steps, flow_shift=d.flow_shift, sampler=d.sampler)
        t2 = now()
        videos = self.decode(latents.to(device))
        t3 = now()
        timings.text_s, timings.transformer_s, timings.vae_s = t1 - t0, t2 - t1, t3 - t2
        return Generation(videos=videos.cpu(), latents=latents.float().cpu(), prompts=list(prompts),
                          seeds=list(seeds), effective_nfe=self.effective_nfe, timings=timings)

    def write_mp4(self, generation: Generation, paths: Sequence[str | Path]) -> list[Path]:
        from tmdcli.artifacts.media import write_mp4_from_tensor

        return [write_mp4_from_tensor(v, p, fps=self.defaults.fps) for v, p in zip(generation.videos, paths)]


def load_generator(model: str | None = None, *, home: str | Path = "tmd-home", device: str = "auto",
                   dtype: str = "auto", **options) -> VideoGenerator:
    """Resolve `model` (teacher name or folder, student reference, or None for the newest student) and load it."""
    return VideoGenerator(resolve_model(model, home), device=device, dtype=dtype, **options)


def default_sampling(ref: ModelRef):
    """The video size and sampler settings a model samples with by default (its teacher's)."""
    return teacher_defaults(ref.teacher)
