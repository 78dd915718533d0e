"""`tmd eval`: every model samples the same prompts with the same seeds; score them; write the report.

Suites: `quick` (offline VBench-style metrics, evaluation/metrics.py), `toy` (toy-grammar captions, seen and held
out, read by the toy analyzer, evaluation/toy.py) and `vbench` (VBench in its own interpreter,
evaluation/vbench_runner.py, after a preflight that runs before any video is made). A model `NAME@S` is teacher NAME
sampled with its own sampler at S steps, so one run can set a teacher's 50 steps beside 1, 2 and 4. Samples go into
the artifact's staging folder one file at a time, and VBench results one dimension at a time, so a rerun resumes and
re-scores without regenerating. Output: results.json, report.md, quality_vs_nfe.png, gallery.html and samples/.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tmdcli.artifacts.fingerprint import canonical_json, sha256_bytes
from tmdcli.artifacts.media import ffmpeg_plan_row
from tmdcli.artifacts.store import Artifact, Staging, Store
from tmdcli.errors import UsageError
from tmdcli.evaluation import report, vbench
from tmdcli.stages.common import NOT_IDENTITY, Plan, Runtime
from tmdcli.stages.synth_videos import (
    check_video_size,
    chunks,
    external_model,
    resolve_input,
    size_rules,
    staged_count,
    teacher_folder,
)

STAGE, STAGE_VERSION, OUTPUT_KIND = "eval", 1, "eval"
DATA_PARALLEL = False  # one process samples and scores; a second run of the same eval is refused
SUITES = ("quick", "toy", "vbench")
DEFAULT_SAMPLES = {"quick": 4, "toy": 2, "vbench": vbench.SAMPLES_PER_PROMPT}
DEFAULT_TOY_PROMPTS = 16  # captions per split (train and heldout)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """eval settings. The fields after `name` are filled by plan(): what the models, prompts and encoders resolved
    to, so the fingerprint follows content (a student's fingerprint, the prompt list's hash), not spelling."""

    models: tuple[str, ...] = field(default=(), metadata=NOT_IDENTITY)  # as given (NAME@S: teacher at S steps)
    suite: str = "quick"
    prompts: str | None = field(default=None, metadata=NOT_IDENTITY)  # text file or prompts artifact (quick)
    toy_prompts: int | None = field(default=None, metadata=NOT_IDENTITY)  # toy: captions per split (16); hashed
    samples_per_prompt: int | None = None  # None: 4 (quick), 2 (toy) or 5 (vbench)
    seed: int = 0  # seed of sample i of prompt p: seed + K * p + i
    teacher_steps: int | None = None  # None: the teacher's own sampler steps (50); NAME@S overrides per model
    num_frames: int | None = None  # None: the first model's default size
    height: int | None = None
    width: int | None = None
    clip_model: str | None = field(default=None, metadata=NOT_IDENTITY)  # local CLIP (quick): folder or file
    clip_arch: str = "ViT-B-32"  # open_clip architecture of a checkpoint file
    dimensions: tuple[str, ...] | None = None  # vbench: a subset for smoke runs; None = all 16
    augmented_prompts: str | None = field(default=None, metadata=NOT_IDENTITY)  # vbench: JSON or TSV short->long
    vbench_python: str | None = field(default=None, metadata=NOT_IDENTITY)
    vbench_cache: str | None = field(default=None, metadata=NOT_IDENTITY)
    collapse_ratio: float = 0.5  # flag a model whose seed diversity falls below this fraction of the reference's
    dtype: str = "auto"
    batch_size: int = field(default=4, metadata=NOT_IDENTITY)  # per-sample seeds: batching does not pick the noise
    name: str | None = field(default=None, metadata=NOT_IDENTITY)
    model_keys: tuple[str, ...] = ()
    prompts_sha256: str | None = None
    clip_identity: str | None = None
    vbench_version: str | None = None
    # speed options (runtime/speed.py): only the exact ones are accepted here (check_exact), hence not identity
    vae_dtype: str = field(default="auto", metadata=NOT_IDENTITY)
    decoder: str = field(default="auto", metadata=NOT_IDENTITY)
    compile: bool = field(default=False, metadata=NOT_IDENTITY)
    attention: str | None = field(default=None, metadata=NOT_IDENTITY)
    cuda_graphs: bool = field(default=False, metadata=NOT_IDENTITY)


@dataclass
class ModelSpec:
    """One row of the report: the reference as given, what it resolved to, and where its samples go."""

    label: str
    ref: object  # api.ModelRef
    key: str
    sample_dir: str
    effective_nfe: float
    num_steps: int | None = None  # a teacher's sampler steps; None for a student


def _distinct(specs: list[ModelSpec]) -> dict[str, ModelSpec]:
    """The first spec of each distinct model: a model listed twice is sampled once."""
    out: dict[str, ModelSpec] = {}
    for spec in specs:
        out.setdefault(spec.key, spec)
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:32] or "model"


# --------------------------------------------------------------------------------------------------------------
# Plan


def plan(cfg: EvalConfig, store: Store) -> Plan:
    """Resolve models, prompts, size and encoders and check everything (VBench's environment included); no torch."""
    from tmdcli.runtime.speed import check_exact, from_config

    _check_options(cfg)
    check_exact(from_config(cfg), "eval")
    k = cfg.samples_per_prompt or DEFAULT_SAMPLES[cfg.suite]
    if store.plan_missing_inputs and not store.list("student") and any(
            parse_model_spec(m)[0] in ("latest", "student:latest") for m in cfg.models):
        return _plan_before_students(cfg, store, k)
    specs, inputs, teachers = _resolve_models(cfg, store)
    first = specs[0].ref
    from tmdcli.registry import teacher_defaults

    defaults = teacher_defaults(first.teacher)
    size = (cfg.num_frames or defaults.num_frames, cfg.height or defaults.height, cfg.width or defaults.width)
    if cfg.suite == "toy":
        size = _toy_size(cfg)
    for spec in specs:
        check_video_size(*size, size_rules(teacher_folder(spec.ref.teacher)), f"--model {spec.label}")
    facts: dict = {"fps": vbench.FPS if cfg.suite == "vbench" else defaults.fps, "size": size}
    clip_identity = vbench_version = None
    if cfg.suite == "quick":
        items, source, prompts_artifact = _quick_prompts(cfg.prompts, store)
        if prompts_artifact is not None:  # lineage, and its licence travels with the samples
            inputs.append(("prompts", prompts_artifact))
            facts["prompts_license"] = (prompts_artifact.manifest.facts or {}).get("license")
        if cfg.clip_model:
            from tmdcli.evaluation.clip import check_clip

            facts["clip"] = check_clip(cfg.clip_model, cfg.clip_arch)
            clip_identity = _clip_identity(facts["clip"])
    elif cfg.suite == "toy":
        from tmdcli.evaluation.toy import toy_prompts

        n = cfg.toy_prompts or DEFAULT_TOY_PROMPTS
        items, source = toy_prompts(n, cfg.seed), f"toy grammar, {n} train + {n} held-out captions (seed {cfg.seed})"
    else:
        try:
            items, source, facts["vbench"] = _vbench_prompts(cfg)
        except UsageError as exc:
            if not store.plan_missing_inputs:
                raise
            return _plan_before_students(cfg, store, k, blocked=exc)
        vbench_version = facts["vbench"]["version"]
    prompts_sha = sha256_bytes(canonical_json([[p["prompt"], p["generate_from"]] for p in items]).encode())
    for item in items:
        item["seeds"] = [vbench.video_seed(cfg.seed, item["index"], i, k) for i in range(k)]
        item["files"] = [vbench.video_name(item["prompt"], i) if cfg.suite == "vbench"
                         else f"p{item['index']:04d}-{i}.mp4" for i in range(k)]
    r = dataclasses.replace(cfg, samples_per_prompt=k, num_frames=size[0], height=size[1], width=size[2],
                            model_keys=tuple(s.key for s in specs),
                            prompts_sha256=prompts_sha, clip_identity=clip_identity, vbench_version=vbench_version)
    p = Plan.build(store, stage=STAGE, stage_version=STAGE_VERSION, kind=OUTPUT_KIND, cfg=r, inputs=inputs,
                   external_models=teachers, name=r.name)
    unique = _distinct(specs)
    names = [f"samples/{s.sample_dir}/{f}" for s in unique.values() for it in items for f in it["files"]]
    done = staged_count(store, OUTPUT_KIND, p.output_id, names)
    p.rows += [(f"model {j}", f"{s.label}: {s.ref.kind} {s.ref.label}, effective NFE {s.effective_nfe:.3g}"
                + (" (reference)" if j == 0 else "")) for j, s in enumerate(specs)]
    p.rows += [("suite", cfg.suite + {"quick": " (offline VBench-style metrics)",
                                      "toy": " (toy analyzer: adherence, Frechet, diversity)"}.get(cfg.suite, "")),
               ("prompts", f"{len(items)} from {source} x {k} seeds (seed + {k} * prompt + i)"),
               ("video", f"{'x'.join(map(str, size))} at {facts['fps']} fps"),
               ("samples", f"{len(names)} clips for {len(unique)} distinct model(s)"
                + (f", {done} already made (resume)" if done else "")),
               ("compute", f"{sum(s.effective_nfe for s in unique.values()) * len(items) * k:.0f} transformer "
                           f"evaluations and {len(names)} VAE decodes")]
    if cfg.suite == "vbench":
        v = facts["vbench"]
        p.rows += [("vbench", f"{v['version']} via {cfg.vbench_python} (python {v['python']}), dimensions "
                              f"{', '.join(v['dimensions'])}, prompts {v['prompt_form']}")]
    elif cfg.clip_model:
        p.rows += [("clip", f"{facts['clip']['kind']} {facts['clip']['path']}")]
    p.rows.append(ffmpeg_plan_row(required=not (store.plan_missing_inputs or p.complete)))  # before any sampling
    if not report.can_plot():  # the report is still written; only the PNG is left out (report.PLOT_MISSING_NOTE)
        p.rows += [("plot", report.PLOT_MISSING_NOTE)]
    p.rows.append(("screenshot", _screenshot_plan()))
    p.facts.update(facts, specs=specs, prompts=items, prompts_source=source, cfg=r)
    return p


def _plan_before_students(cfg: EvalConfig, store: Store, k: int, blocked: UsageError | None = None) -> Plan:
    """A dry run's plan when the students to score are not made yet (a recipe's DRY_RUN), or when VBench's
    environment is missing: what would be scored, and what stops a real run."""
    from tmdcli.artifacts.store import PlannedInput

    rows = [(f"model {j}", "the newest student (not made yet: the distill plan above)"
             if parse_model_spec(m)[0] in ("latest", "student:latest") and not store.list("student") else m)
            for j, m in enumerate(cfg.models)]
    rows.append(("suite", f"{cfg.suite}, {k} samples per prompt"))
    if blocked is not None:
        rows.append(("vbench", f"NOT AVAILABLE: {blocked.message}" + (f" ({blocked.hint})" if blocked.hint else "")))
        rows.append(("note", "a real run stops here with exit 2 until the above is fixed"))
    rows.append(ffmpeg_plan_row(required=False))  # a dry run: shown, never an error
    if not report.can_plot():
        rows.append(("plot", report.PLOT_MISSING_NOTE))
    inputs = [("model", PlannedInput("student"))] if not store.list("student") else []
    return Plan.build(store, stage=STAGE, stage_version=STAGE_VERSION, kind=OUTPUT_KIND, cfg=cfg, inputs=inputs,
                      name=cfg.name, rows=rows)


def _check_options(cfg: EvalConfig) -> None:
    if cfg.suite not in SUITES:
        raise UsageError(f"unknown suite {cfg.suite!r}", hint="use --suite quick, --suite toy or --suite vbench")
    if not cfg.models:
        raise UsageError("no --model given", hint="e.g. tmd eval --model tiny-random --model latest --prompts p.txt")
    if cfg.samples_per_prompt is not None and cfg.samples_per_prompt < 1:
        raise UsageError(f"--samples-per-prompt must be >= 1, got {cfg.samples_per_prompt}")
    if cfg.suite == "vbench" and (cfg.samples_per_prompt or 0) > vbench.SAMPLES_PER_PROMPT:
        raise UsageError(f"VBench reads {vbench.SAMPLES_PER_PROMPT} samples per prompt at most")
    if cfg.batch_size < 1 or (cfg.teacher_steps is not None and cfg.teacher_steps < 1):
        raise UsageError("--batch-size and --teacher-steps must be >= 1")
    if not 0 < cfg.collapse_ratio <= 1:
        raise UsageError(f"--collapse-ratio must be in (0, 1], got {cfg.collapse_ratio}")
    only = {"--prompts": (cfg.prompts, "quick"), "--clip-model": (cfg.clip_model, "quick"),
            "--toy-prompts": (cfg.toy_prompts, "toy"), "--dimensions": (cfg.dimensions, "vbench"),
            "--augmented-prompts": (cfg.augmented_prompts, "vbench")}
    wrong = [k for k, (value, suite) in only.items() if value and suite != cfg.suite]
    if wrong:
        raise UsageError(f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to --suite {cfg.suite}",
                         hint="--prompts and --clip-model are for --suite quick, --toy-prompts for --suite toy (its "
                              "captions come from the toy grammar), --dimensions and --augmented-prompts for --suite "
                              "vbench (VBench's own prompt list)")
    if cfg.suite == "quick" and not cfg.prompts:
        raise UsageError("--suite quick needs --prompts", hint="a text file (one prompt a line) or a prompts artifact")
    if cfg.suite == "toy" and cfg.toy_prompts is not None:
        from tmdcli.evaluation.toy import max_prompts

        most = min(max_prompts(split) for split in ("train", "heldout"))
        if not 1 <= cfg.toy_prompts <= most:
            raise UsageError(f"--toy-prompts must be in [1, {most}] (distinct held-out captions), got "
                             f"{cfg.toy_prompts}")


def _toy_size(cfg: EvalConfig) -> tuple[int, int, int]:
    """The toy world's clip size: the analyzer's thresholds are pixels and frames of the grammar's clips."""
    from tmdcli.toy.grammar import FRAME_SIZE, NUM_FRAMES

    size = (NUM_FRAMES, FRAME_SIZE, FRAME_SIZE)
    if any(asked is not None and asked != own for asked, own in zip((cfg.num_frames, cfg.height, cfg.width), size)):
        raise UsageError(f"--suite toy scores {NUM_FRAMES}x{FRAME_SIZE}x{FRAME_SIZE} clips (frames x height x width), "
                         "the toy grammar's size", hint="leave out --frames, --height and --width")
    return size


def parse_model_spec(text: str) -> tuple[str, int | None]:
    """`NAME@S` -> (NAME, S): a teacher sampled with its own sampler at S steps; anything else -> (text, None).

    A name that exists as given (a registered teacher, a folder or file) is never split, so paths may hold '@'.
    """
    from tmdcli.registry import REGISTRY

    if "@" not in text or text in REGISTRY or Path(text).expanduser().exists():
        return text, None
    base, _, steps = text.rpartition("@")
    if not base or not steps.isdigit() or int(steps) < 1:
        raise UsageError(f"bad --model {text!r}: NAME@S needs a teacher name and a step count S >= 1",
                         hint="e.g. --model toy@2 (the toy teacher's own sampler at 2 steps)")
    return base, int(steps)


def _resolve_models(cfg: EvalConfig, store: Store) -> tuple[list[ModelSpec], list, list]:
    """ModelSpecs (labels unique, one sample folder per distinct model), student inputs, teacher external models."""
    from tmdcli.api import resolve_model
    from tmdcli.registry import teacher_defaults

    specs, students, teachers, folders, seen = [], {}, {}, {}, {}
    for ref_text in cfg.models:
        name, steps_override = parse_model_spec(ref_text)
        ref = resolve_model(name, store.home)
        steps = None
        if ref.kind == "student":
            if steps_override is not None:
                raise UsageError(f"bad --model {ref_text!r}: @S sets a teacher's sampler steps and {name} is a "
                                 "student", hint="a student samples with its own (M, N) steps; drop the @S")
            artifact = resolve_input(store, ref.artifact_id, "student", "--model")
            students[artifact.id] = artifact
            key, nfe = f"student:{artifact.fingerprint}", float(ref.student_info["effective_nfe"])
        else:
            ext = external_model(ref.teacher, teacher_folder(ref.teacher))
            teachers[canonical_json(ext)] = ext
            d = teacher_defaults(ref.teacher)
            steps = steps_override or cfg.teacher_steps or d.num_steps
            nfe = float(steps * (1 if d.guidance_scale == 1 else 2))  # CFG doubles the teacher's evaluations
            key = f"teacher:{canonical_json(ext)}:steps={steps}"
        seen[ref_text] = seen.get(ref_text, 0) + 1
        label = ref_text if seen[ref_text] == 1 else f"{ref_text}#{seen[ref_text]}"
        slug = _slug(ref.label + (f"-{steps_override}-steps" if steps_override else ""))
        folders.setdefault(key, f"{len(folders)}-{slug}")
        specs.append(ModelSpec(label=label, ref=ref, key=key, sample_dir=folders[key], effective_nfe=nfe,
                               num_steps=steps))
    return specs, [(f"model-{a.id}", a) for a in students.values()], list(teachers.values())


def _quick_prompts(prompts: str, store: Store) -> tuple[list[dict], str, Artifact | None]:
    """[{index, prompt (short: CLIP and display), generate_from}] from a text file or a prompts artifact."""
    path = Path(prompts).expanduser()
    if path.is_file():
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise UsageError(f"--prompts {path} is not UTF-8 text") from exc
        pairs, source, artifact = [(line, line) for line in lines], str(path), None
    else:
        artifact = resolve_input(store, prompts, "prompts", "--prompts")
        pairs, source = _artifact_prompts(artifact), artifact.id
    if not pairs:
        raise UsageError(f"--prompts {prompts} holds no prompt", hint="one prompt per line")
    items = [{"index": i, "prompt": short, "generate_from": long} for i, (short, long) in enumerate(pairs)]
    return items, source, artifact


def _artifact_prompts(artifact: Artifact) -> list[tuple[str, str]]:
    from tmdcli.stages.make_prompts import PROMPTS_FILE, read_prompts_table

    table = read_prompts_table(artifact.file(PROMPTS_FILE), artifact.id).to_pylist()
    rows = sorted(table, key=lambda r: r["id"])
    return [(r.get("source_prompt") or r["prompt"], r["prompt"]) for r in rows]


def _vbench_prompts(cfg: EvalConfig) -> tuple[list[dict], str, dict]:
    """Preflight the VBench environment, then the standard prompt list (optionally augmented) for the dimensions."""
    from tmdcli.evaluation.vbench_runner import preflight, vbench_env

    dims = list(cfg.dimensions) if cfg.dimensions else list(vbench.DIMENSIONS)
    try:
        vbench.check_dimensions(dims)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    env = vbench_env(cfg.vbench_python, cfg.vbench_cache)
    found = preflight(env, dims)
    try:
        augmented = vbench.read_augmented(cfg.augmented_prompts) if cfg.augmented_prompts else None
        prompts = vbench.suite_prompts(vbench.load_full_info(found.full_info), dims, augmented)
        vbench.check_file_names(prompts)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    items = [{"index": p.index, "prompt": p.prompt, "generate_from": p.generate_from, "dimensions": p.dimensions}
             for p in prompts]
    form = f"augmented from {cfg.augmented_prompts}" if augmented is not None else "short (not augmented)"
    info = {"version": found.vbench_version, "python": found.python_version, "full_info": str(found.full_info),
            "dimensions": dims, "prompt_form": form, "env": {k: str(v) for k, v in env.roots.items()}}
    return items, str(found.full_info), info


def _clip_identity(info: dict) -> str:
    """Content, not location: a folder's config.json and file sizes, or a checkpoint's size and architecture."""
    path = Path(info["path"])
    if info["kind"] == "transformers":
        listing = sorted((f.name, f.stat().st_size) for f in path.iterdir() if f.is_file())
        return sha256_bytes(canonical_json([(path / "config.json").read_text(), listing]).encode())
    return sha256_bytes(canonical_json([info["arch"], info["bytes"]]).encode())


# --------------------------------------------------------------------------------------------------------------
# Run


def run(cfg: EvalConfig, plan: Plan, staging: Staging, rt: Runtime) -> Artifact:
    """Sample what is missing, score every model, write the report files and commit."""
    if rt.num_workers > 1:
        raise UsageError("tmd eval runs in one process", hint="run it without accelerate launch or --shard")
    from tmdcli.evaluation import scoring
    from tmdcli.runtime.dist import device_for

    cfg, specs, prompts = plan.facts["cfg"], plan.facts["specs"], plan.facts["prompts"]
    unique, loaded = _distinct(specs), {}
    timings = {key: _sample(spec, cfg, prompts, plan.facts, staging, rt, loaded) for key, spec in unique.items()}
    loaded.clear()  # free the models before scoring
    if cfg.suite == "quick":
        scores = scoring.score_quick(specs, prompts, staging.path, collapse_ratio=cfg.collapse_ratio,
                                     clip_info=plan.facts.get("clip"), clip_arch=cfg.clip_arch,
                                     device=device_for(rt.device, rt.dist))
    elif cfg.suite == "toy":
        scores = scoring.score_toy(specs, prompts, staging.path, collapse_ratio=cfg.collapse_ratio)
    else:
        by_key = scoring.score_vbench(unique, prompts, staging, plan.facts["vbench"], python=cfg.vbench_python,
                                      cache_dir=cfg.vbench_cache, device="cuda" if rt.device == "auto" else rt.device)
        scores = [by_key[s.key] for s in specs]
    results = _results(plan, cfg, specs, prompts, timings, scores)
    staging.write_bytes("results.json", (json.dumps(results, indent=2) + "\n").encode())
    staging.write_bytes("gallery.html", report.gallery_html(results).encode())
    skipped = _screenshot_gallery(staging)  # before report.md, which shows the picture or says why there is none
    plotted = report.can_plot()
    staging.write_bytes("report.md", report.report_markdown(results, plotted=plotted,
                                                            screenshot_skipped=skipped).encode())
    if plotted:
        with staging.atomic_path(report.PLOT_FILE) as tmp:
            report.plot_quality_vs_nfe(results, tmp)
    else:
        print(f"note: {report.PLOT_MISSING_NOTE}", file=sys.stderr)
    table = report.text_table(results)
    print(table, file=sys.stderr)
    facts = {"suite": cfg.suite, "reference": specs[0].label, "num_prompts": len(prompts),
             "samples_per_prompt": cfg.samples_per_prompt, "report_table": table,
             "models": [{"label": m["label"], "kind": m["kind"], "effective_nfe": m["effective_nfe"]}
                        for m in results["models"]]}
    facts["screenshot"] = f"not taken: {skipped}" if skipped else report.SCREENSHOT_FILE  # `tmd show` lists it
    if plan.facts.get("prompts_license"):
        facts["prompts_license"] = plan.facts["prompts_license"]
    return staging.commit(stats={"num_videos": sum(t["num_videos"] for t in timings.values())}, facts=facts)


def _screenshot_plan() -> str:
    """The dry-run row: which browser will render gallery.png, or why it will be skipped."""
    from tmdcli.evaluation import browser

    binary = browser.find_chromium()
    return (f"{report.SCREENSHOT_FILE} with {binary}" if binary else
            f"{report.SCREENSHOT_FILE} skipped: no Chromium on PATH ({browser.INSTALL_HINT})")


def _screenshot_gallery(staging: Staging) -> str | None:
    """gallery.png, the staged gallery.html rendered by headless Chromium; None when written, else why not.

    Chromium is optional and the samples are already paid for, so a missing or crashing browser is a note, never a
    failed eval.
    """
    from tmdcli.evaluation import browser

    try:
        staging.write_bytes(report.SCREENSHOT_FILE, browser.gallery_screenshot(staging.path / "gallery.html"))
        return None
    except browser.BrowserError as exc:
        (staging.path / report.SCREENSHOT_FILE).unlink(missing_ok=True)  # a resumed run's stale picture
        print(f"note: {report.SCREENSHOT_FILE} not taken: {exc}", file=sys.stderr)
        return str(exc)


def _sample(spec: ModelSpec, cfg: EvalConfig, prompts: list[dict], facts: dict, staging: Staging,
            rt: Runtime, loaded: dict) -> dict:
    """Generate this model's missing clips batch by batch; returns its accumulated time split (kept across runs).

    `loaded` keeps a teacher's generator for the next spec of the same teacher at other steps (toy, toy@2, ...).
    """
    timings_file = f"samples/{spec.sample_dir}.json"  # beside the clip folder: VBench reads every file inside it
    stored = staging.path / timings_file
    totals = json.loads(stored.read_text()) if stored.is_file() else {
        "text_s": 0.0, "transformer_s": 0.0, "vae_s": 0.0, "total_s": 0.0, "num_videos": 0}
    todo = [(p, i) for p in prompts for i in range(len(p["seeds"]))
            if not staging.has(f"samples/{spec.sample_dir}/{p['files'][i]}")]
    if not todo:
        return totals
    from tmdcli.api import VideoGenerator
    from tmdcli.artifacts.media import write_mp4_from_tensor
    from tmdcli.runtime.speed import from_config
    from tmdcli.runtime.dist import device_for
    from tmdcli.runtime.log import Progress

    if spec.ref.kind == "teacher":
        teacher_key = spec.key.rpartition(":steps=")[0]
        if teacher_key not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[teacher_key] = VideoGenerator(spec.ref, device=device_for(rt.device, rt.dist), dtype=cfg.dtype,
                                                 speed=from_config(cfg))
        generator = loaded[teacher_key]
        generator.num_steps = spec.num_steps  # the teacher's own sampler at this spec's steps
    else:
        loaded.clear()
        generator = VideoGenerator(spec.ref, device=device_for(rt.device, rt.dist), dtype=cfg.dtype,
                                   speed=from_config(cfg))
    frames, height, width = facts["size"]
    progress = Progress(len(todo), f"eval: sampling {spec.label}", unit="clips")
    try:
        for batch in chunks(todo, cfg.batch_size):
            out = generator.generate([p["generate_from"] for p, _ in batch], [p["seeds"][i] for p, i in batch],
                                     num_frames=frames, height=height, width=width)
            for video, (p, i) in zip(out.videos, batch, strict=True):
                with staging.atomic_path(f"samples/{spec.sample_dir}/{p['files'][i]}") as tmp:
                    write_mp4_from_tensor(video, tmp, fps=facts["fps"])
            t = out.timings
            for key, value in (("text_s", t.text_s), ("transformer_s", t.transformer_s), ("vae_s", t.vae_s),
                               ("total_s", t.total_s), ("num_videos", len(batch))):
                totals[key] += value
            staging.write_bytes(timings_file, json.dumps(totals).encode())
            progress.update(len(batch))
    finally:
        progress.close()
    return totals


def _finite(obj):
    """NaN and infinities become None: results.json and the manifest hold strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _sampler_settings(ref, num_steps: int | None) -> dict:
    """What produced a model's clips: the teacher's own sampler, or the student's (M, N, H) and grids."""
    from tmdcli.objectives.u_param import stored_u_param

    if ref.kind == "student":
        info = ref.student_info
        keys = ("num_outer_steps", "num_inner_steps", "num_head_blocks")
        return {"algorithm": "TMD Algorithm 1", **{k: info["config"].get(k) for k in keys},
                "u_param": stored_u_param(info["config"]),
                "outer_grid": info.get("outer_grid"), "inner_grid": info.get("inner_grid")}
    from tmdcli.registry import teacher_defaults

    d = teacher_defaults(ref.teacher)
    return {"algorithm": d.sampler, "num_steps": num_steps or d.num_steps, "guidance_scale": d.guidance_scale,
            "flow_shift": d.flow_shift, "negative_prompt": d.negative_prompt}


def _results(plan: Plan, cfg: EvalConfig, specs, prompts, timings: dict, scores: list[dict]) -> dict:
    from tmdcli.evaluation.metrics import METRICS
    from tmdcli.evaluation.toy import TOY_METRICS

    size, k = plan.facts["size"], cfg.samples_per_prompt
    settings = {"num_prompts": len(prompts), "samples_per_prompt": k, "seed": cfg.seed,
                "seed_rule": f"{cfg.seed} + {k} * prompt_index + i", "video": list(size), "fps": plan.facts["fps"],
                "teacher_steps": cfg.teacher_steps, "prompts_source": plan.facts["prompts_source"],
                "prompts_sha256": cfg.prompts_sha256, "collapse_ratio": cfg.collapse_ratio}
    if cfg.suite == "vbench":
        v = plan.facts["vbench"]
        settings.update(vbench_version=v["version"], dimensions=v["dimensions"], prompt_form=v["prompt_form"])
    if cfg.suite == "quick":
        settings["frame_encoder"] = "pooled_pixels (8x8 area-pooled RGB, centred per frame; no weights)"
    if cfg.suite == "toy":
        settings.update(toy_prompts_per_split=cfg.toy_prompts or DEFAULT_TOY_PROMPTS,
                        splits={s: sum(p["split"] == s for p in prompts) for s in ("train", "heldout")})
    if plan.facts.get("clip"):
        settings["clip"] = plan.facts["clip"]
    models = []
    for spec, score in zip(specs, scores, strict=True):
        ref = spec.ref
        models.append({"label": spec.label, "ref": cfg.models[len(models)], "kind": ref.kind,
                       "teacher": ref.teacher.name, "artifact_id": ref.artifact_id,
                       "effective_nfe": spec.effective_nfe, "sample_dir": f"samples/{spec.sample_dir}",
                       "sampler": _sampler_settings(ref, spec.num_steps), "files": [p["files"] for p in prompts],
                       "timings": timings[spec.key], **score})
    labels = {"vbench": "VBench", "toy": "toy world: analyzer metrics on toy-grammar captions (not VBench)"}
    definitions = {"quick": METRICS, "toy": TOY_METRICS}.get(cfg.suite, {})
    keep = ("index", "prompt", "generate_from", "seeds", "split", "scene")
    return _finite({"schema": "tmdcli.eval/1", "artifact_id": plan.output_id, "suite": cfg.suite,
                    "label": labels.get(cfg.suite, "VBench-style offline metrics (not VBench)"),
                    "settings": settings, "prompts": [{k2: p[k2] for k2 in keep if k2 in p} for p in prompts],
                    "models": models,
                    "metric_definitions": {key: {"label": v[0], "better": v[1], "computes": v[2]}
                                           for key, v in definitions.items()}})
