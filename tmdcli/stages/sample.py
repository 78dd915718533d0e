"""`tmd sample`: prompts -> mp4 files with a student (Algorithm 1) or a teacher (its own CFG sampler).

plan() checks everything cheap (prompts, model reference, video size, output paths) without importing torch;
run() loads the model once through the Python API and generates batch by batch.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tmdcli.errors import UsageError


@dataclass(frozen=True, kw_only=True)
class SampleRequest:
    prompt: str | None = None
    prompts_file: Path | None = None
    model: str | None = None
    out: Path | None = None
    seed: int = 0
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 4
    num_outer_steps: int | None = None  # M of an init student built from a teacher
    num_inner_steps: int | None = None  # N
    num_head_blocks: int | None = None  # H
    num_steps: int | None = None  # teacher sampler steps
    guidance_scale: float | None = None
    home: Path = Path("tmd-home")
    device: str = "auto"
    dtype: str = "auto"
    dry_run: bool = False  # plan only: a missing ffmpeg is shown, not an error
    verify_inputs: bool = True  # sha256 of a student's files against its manifest (sizes are always checked)
    speed: object = None  # runtime.speed.SpeedOptions (None: the defaults)


@dataclass
class SamplePlan:
    request: SampleRequest
    ref: object  # api.ModelRef
    prompts: list[str]
    seeds: list[int]
    paths: list[Path]
    num_frames: int
    height: int
    width: int
    init_student: tuple[int, int, int] | None
    effective_nfe: float | None
    notes: list[str] = field(default_factory=list)
    ffmpeg: str = ""  # the ffmpeg that will write the mp4s, or what is missing (dry run)


@dataclass
class SampleResult:
    paths: list[Path]
    effective_nfe: float
    timings: dict

    def to_dict(self) -> dict:
        return {"paths": [str(p) for p in self.paths], "effective_nfe": self.effective_nfe, "timings": self.timings}


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "video"


def read_prompts(request: SampleRequest) -> list[str]:
    if request.prompt is not None and request.prompts_file is not None:
        raise UsageError("give either a PROMPT or --prompts-file, not both")
    if request.prompts_file is not None:
        path = Path(request.prompts_file)
        if not path.is_file():
            raise UsageError(f"prompts file {path} does not exist")
        try:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise UsageError(f"prompts file {path} is not UTF-8 text") from exc
        if not prompts:
            raise UsageError(f"prompts file {path} holds no prompt", hint="one prompt per line")
        return prompts
    if request.prompt is None:
        raise UsageError("no prompt given", hint='tmd sample "a cat surfing" (or --prompts-file FILE)')
    if not request.prompt.strip():
        raise UsageError("the prompt is empty", hint='give some text, e.g. tmd sample "a cat surfing"')
    return [request.prompt.strip()]


def output_paths(out: Path | None, prompts: list[str], seeds: list[int]) -> list[Path]:
    """One mp4 per prompt: `out` itself for a single prompt ending in .mp4, else files inside folder `out`."""
    if out is not None and len(prompts) == 1 and Path(out).suffix.lower() == ".mp4":
        paths = [Path(out)]
    else:
        folder = Path(out) if out is not None else Path("tmd-samples")
        if folder.suffix.lower() == ".mp4":
            raise UsageError(f"--out {folder} is a file name but {len(prompts)} prompts were given",
                             hint="pass a folder for several prompts")
        width = len(str(len(prompts) - 1))
        paths = [folder / f"{i:0{width}d}_{_slug(p)}_s{s}.mp4" for i, (p, s) in enumerate(zip(prompts, seeds))]
    for path in paths:
        _check_writable(path)
    return paths


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"output {path} is a folder", hint="give a file name ending in .mp4")
    parent = path.parent
    probe = parent
    while not probe.exists():  # the nearest existing ancestor decides whether we may create the folder
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {path}: {probe} is not a writable folder",
                         hint="choose another --out (a folder you can write to)")


def _probe_write(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".tmd-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write into {folder}: {exc.strerror or exc}",
                         hint="choose another --out (a folder you can write to)") from exc


def plan(request: SampleRequest) -> SamplePlan:
    """Resolve prompts, model, size, seeds and outputs; nothing heavy is imported and nothing is written."""
    from tmdcli.api import default_sampling, resolve_model

    from tmdcli.runtime.speed import SpeedOptions, check

    if request.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {request.batch_size}")
    check(request.speed or SpeedOptions())
    prompts = read_prompts(request)
    ref = resolve_model(request.model, request.home)
    defaults = default_sampling(ref)
    num_frames = defaults.num_frames if request.num_frames is None else request.num_frames
    height = defaults.height if request.height is None else request.height
    width = defaults.width if request.width is None else request.width
    if num_frames < 1 or height < 1 or width < 1:
        raise UsageError(f"frames, height and width must be positive, got {num_frames}x{height}x{width}")
    init_student = None
    chosen = (request.num_outer_steps, request.num_inner_steps, request.num_head_blocks)
    notes = []
    if ref.kind == "teacher" and any(v is not None for v in chosen):
        m, n, h = (default if value is None else value for value, default in zip(chosen, (2, 2, 5)))
        if m < 1 or n < 1 or h < 1:
            raise UsageError(f"M, N and H must be >= 1, got M={m} N={n} H={h}")
        init_student = (m, n, h)
        notes.append(f"untrained TMD student M{m} N{n} H{h} built from the teacher at init (speed/sanity only)")
    if ref.kind == "student":
        if request.num_outer_steps is not None or request.num_head_blocks is not None:
            raise UsageError("--m and --h describe how a student was trained and cannot change at sampling",
                             hint="only --n (inner steps) may differ from training")
        if request.num_inner_steps is not None and request.num_inner_steps < 1:
            raise UsageError(f"N must be >= 1, got {request.num_inner_steps}")
    if ref.kind == "teacher" and (request.num_steps is not None and request.num_steps < 1):
        raise UsageError(f"--steps must be >= 1, got {request.num_steps}")
    seeds = [request.seed + i for i in range(len(prompts))]
    paths = output_paths(request.out, prompts, seeds)
    nfe = None
    if ref.kind == "student":
        info = ref.student_info
        c = info["config"]
        n = c["num_inner_steps"] if request.num_inner_steps is None else request.num_inner_steps
        from tmdcli.objectives.grids import effective_nfe

        nfe = effective_nfe(c["num_outer_steps"], n, c["num_head_blocks"], info["num_blocks"])
    from tmdcli.artifacts.media import ffmpeg_plan_row

    ffmpeg = ffmpeg_plan_row(required=not request.dry_run)[1]  # before any weights are loaded
    return SamplePlan(request=request, ref=ref, prompts=prompts, seeds=seeds, paths=paths, num_frames=num_frames,
                      height=height, width=width, init_student=init_student, effective_nfe=nfe, notes=notes,
                      ffmpeg=ffmpeg)


def render_plan(p: SamplePlan, console) -> None:
    model = f"{p.ref.kind} {p.ref.label}" + (f" (teacher {p.ref.teacher.name})" if p.ref.kind == "student" else "")
    console.print(f"[bold]sample[/bold]: {len(p.prompts)} prompt(s) with {model}, "
                  f"{p.num_frames}x{p.height}x{p.width}, seeds {p.seeds[0]}..{p.seeds[-1]}")
    if p.ref.kind == "student":
        from tmdcli.objectives.u_param import U_FORMS, stored_u_param

        c = p.ref.student_info["config"]
        form = "DMD2-v (x_t - t v)" if c.get("method") == "dmd2v" else U_FORMS[stored_u_param(c)]
        console.print(f"  student: M{c['num_outer_steps']} N{c['num_inner_steps']} H{c['num_head_blocks']}, "
                      f"effective NFE {p.effective_nfe:.3g}, {form}", markup=False)
    for note in p.notes:
        console.print(f"  note: {note}")
    speed = p.request.speed
    if speed is not None:
        chosen = {k: v for k, v in speed.to_dict().items() if k != "compile_backend"}
        console.print("  speed: " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
    console.print(f"  ffmpeg: {p.ffmpeg}", markup=False)
    console.print(f"  output: {p.paths[0]}" + (f" ... ({len(p.paths)} files)" if len(p.paths) > 1 else ""))


def verify_student(ref, request: SampleRequest) -> None:
    """A student's files against its manifest before any weight is loaded (DESIGN.md 3): exit 1 naming a damaged
    file."""
    from tmdcli.artifacts.store import load_artifact
    from tmdcli.artifacts.verify_inputs import verify_inputs

    verify_inputs(Path(request.home), [("model", load_artifact(ref.student_dir.parent))],
                  hashes=request.verify_inputs)


def run(p: SamplePlan, console) -> SampleResult:
    from tmdcli.api import Timings, VideoGenerator

    r = p.request
    for path in p.paths:  # fail before loading any weights when the output cannot be written
        _probe_write(path.parent)
    if p.ref.kind == "student":
        verify_student(p.ref, r)
    generator = VideoGenerator(p.ref, device=r.device, dtype=r.dtype, inner_steps=r.num_inner_steps,
                               init_student=p.init_student, num_steps=r.num_steps, guidance_scale=r.guidance_scale,
                               speed=r.speed)
    try:
        generator.teacher.latent_shape(p.num_frames, p.height, p.width)
    except ValueError as exc:
        raise UsageError(f"video size {p.num_frames}x{p.height}x{p.width} does not fit the model: {exc}") from exc
    total, write_s = Timings(), 0.0
    for start in range(0, len(p.prompts), r.batch_size):
        end = min(start + r.batch_size, len(p.prompts))
        gen = generator.generate(p.prompts[start:end], p.seeds[start:end], num_frames=p.num_frames,
                                 height=p.height, width=p.width)
        t0 = time.perf_counter()
        generator.write_mp4(gen, p.paths[start:end])
        write_s += time.perf_counter() - t0  # reported apart: encoding mp4s is not sampling (issue 18)
        total.text_s += gen.timings.text_s
        total.transformer_s += gen.timings.transformer_s
        total.vae_s += gen.timings.vae_s
        console.print(f"  {end}/{len(p.prompts)} videos")
    nfe = generator.effective_nfe
    print(f"effective NFE {nfe:.3g} | {total} | mp4 write {write_s:.3f} s", file=sys.stderr)
    return SampleResult(paths=p.paths, effective_nfe=nfe,
                        timings={"text_s": total.text_s, "transformer_s": total.transformer_s,
                                 "vae_s": total.vae_s, "total_s": total.total_s, "mp4_write_s": write_s})
