"""`tmd make-prompts`: a prompt source -> filter chain -> expander -> a `prompts` artifact (EVAL.md 4.4, 5, 8).

plan() reads and filters the source (cheap; no torch) so --dry-run shows the counts, the chunks and the compute;
run() expands chunk by chunk, each chunk an atomic Parquet file, so a killed run resumes from the chunks present,
then merges them into prompts.parquet.

Artifact files:
    prompts.parquet            id, source_prompt, prompt, expander, seed, spec, source_key, status
    chunks/chunk-00000.parquet the same columns for ids [k * chunk_size, (k + 1) * chunk_size); kept as written
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tmdcli.errors import UsageError
from tmdcli.stages.common import NOT_IDENTITY, Plan

STAGE, STAGE_VERSION, OUTPUT_KIND = "make-prompts", 1, "prompts"
PROMPTS_FILE = "prompts.parquet"
CHUNKS_DIR = "chunks"
COLUMNS = ("id", "source_prompt", "prompt", "expander", "seed", "spec", "source_key", "status")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class MakePromptsConfig:
    """Everything `make-prompts` does. The source file and the expander model enter the fingerprint by content
    (sha256 or cache revision), not by path, so moving a file does not start a new artifact."""

    source: str = field(metadata=NOT_IDENTITY)  # a file, or toy / toy-heldout / toy-all [:COUNT]
    expander: str = field(default="auto", metadata=NOT_IDENTITY)  # auto: toy for toy sources, else qwen2.5-7b
    backend: str = "transformers"  # or vllm (optional extra)
    limit: int | None = None  # after filtering: a seeded subset, kept in source order
    seed: int = 0  # base seed; prompt `id` gets seed + id (expansion, and the video seed downstream)
    # -- filters (EVAL.md 4.4); skipped for toy sources
    clean: bool = True  # HTML entities, Pika flags (and everything after -neg), URLs, Discord residue
    nsfw_threshold: float | None = 0.1  # drop when max(Detoxify scores) > threshold; None: off
    min_ascii_letter_ratio: float = 0.9  # English test; 0: off
    min_words: int = 3
    max_words: int = 120  # 0: no upper bound
    blocklist: tuple[str, ...] = ()
    dedupe: bool = True
    drop_vbench: bool = True
    vbench_prompts: Path | None = field(default=None, metadata=NOT_IDENTITY)  # content hashed; else installed vbench
    toy_two_object_prob: float = 0.0
    # -- expansion (language-model expanders)
    max_new_tokens: int = 512
    do_sample: bool = True  # False: greedy
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    repetition_penalty: float = 1.05
    batch_size: int = 16
    min_expanded_words: int = 25
    max_expanded_words: int = 250
    max_retries: int = 1
    dtype: str = "auto"
    chunk_size: int = 256  # prompts per chunk file (the unit of resume)
    # -- recorded, not fingerprinted
    name: str | None = field(default=None, metadata=NOT_IDENTITY)
    provenance: str = field(default="", metadata=NOT_IDENTITY)  # e.g. where an imported list came from
    license: str = field(default="", metadata=NOT_IDENTITY)  # default: detected (VidProM: CC-BY-NC-4.0)


# --------------------------------------------------------------------------------------------------------------
# Config helpers


def with_overrides(cfg: MakePromptsConfig, pairs: Sequence[str]) -> MakePromptsConfig:
    """Apply `--set key=value` pairs (typed by the config's fields; `none` clears an optional field)."""
    if not pairs:
        return cfg
    hints = typing.get_type_hints(MakePromptsConfig)
    names = [f.name for f in dataclasses.fields(MakePromptsConfig)]
    changes = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in hints:
            raise UsageError(f"--set {pair!r}: unknown key" if sep else f"--set {pair!r}: expected KEY=VALUE",
                             hint=f"keys: {', '.join(names)}")
        changes[key] = _convert(key, text.strip(), hints[key])
    return dataclasses.replace(cfg, **changes)


def _convert(key: str, text: str, hint):
    args = typing.get_args(hint)
    if type(None) in args:
        if text.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes", "on")
        if hint in (int, float, str):
            return hint(text)
        if hint is Path:
            return Path(text)
        if typing.get_origin(hint) is tuple:
            return tuple(w.strip() for w in text.split(",") if w.strip())
    except ValueError:
        raise UsageError(f"--set {key}={text}: expected {getattr(hint, '__name__', hint)}") from None
    raise UsageError(f"--set {key}: unsupported type {hint}")  # pragma: no cover


def check_config(cfg: MakePromptsConfig) -> None:
    problems = []
    for key in ("chunk_size", "batch_size", "max_new_tokens"):
        if getattr(cfg, key) < 1:
            problems.append(f"{key} must be >= 1")
    if cfg.limit is not None and cfg.limit < 1:
        problems.append("--limit must be >= 1")
    if cfg.min_words < 0 or cfg.max_words < 0:
        problems.append("--min-words/--max-words must be >= 0")
    if cfg.max_words and cfg.max_words < cfg.min_words:
        problems.append(f"--max-words {cfg.max_words} is below --min-words {cfg.min_words}")
    if cfg.nsfw_threshold is not None and not 0.0 <= cfg.nsfw_threshold <= 1.0:
        problems.append("--nsfw-threshold must be in [0, 1] (1 keeps everything)")
    if cfg.max_expanded_words < cfg.min_expanded_words:
        problems.append("max_expanded_words is below min_expanded_words")
    if cfg.max_retries < 0:
        problems.append("max_retries must be >= 0")
    if not 0.0 <= cfg.toy_two_object_prob <= 1.0:
        problems.append("toy_two_object_prob must be in [0, 1]")
    if cfg.dtype not in DTYPES:
        problems.append(f"--dtype must be one of {', '.join(DTYPES)}")
    if problems:
        raise UsageError("; ".join(problems))


def filter_config(cfg: MakePromptsConfig):
    from tmdcli.data.prompt_sources import FilterConfig

    return FilterConfig(clean=cfg.clean, nsfw_threshold=cfg.nsfw_threshold,
                        min_ascii_letter_ratio=cfg.min_ascii_letter_ratio, min_words=cfg.min_words,
                        max_words=cfg.max_words, blocklist=tuple(cfg.blocklist), dedupe=cfg.dedupe,
                        drop_vbench=cfg.drop_vbench, limit=cfg.limit, seed=cfg.seed)


def generation_settings(cfg: MakePromptsConfig):
    from tmdcli.data.expanders import GenerationSettings

    return GenerationSettings(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                              temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                              repetition_penalty=cfg.repetition_penalty, batch_size=cfg.batch_size,
                              min_words=cfg.min_expanded_words, max_words=cfg.max_expanded_words,
                              max_retries=cfg.max_retries)


def chunk_name(k: int) -> str:
    return f"{CHUNKS_DIR}/chunk-{k:05d}.parquet"


def prompt_seed(base_seed: int, prompt_id: int) -> int:
    """The per-prompt seed: base + id (as `tmd sample` does), used by the expander and by synth-videos."""
    return base_seed + prompt_id


# --------------------------------------------------------------------------------------------------------------
# plan


@dataclass
class _Resolved:
    """What plan() resolved and run() uses (kept on plan.facts, never written)."""

    spec: object
    ref: object
    prepared: object
    is_vidprom: bool
    vbench_origin: str | None


def plan(cfg: MakePromptsConfig, store) -> Plan:
    """Resolve the source and expander, run the filters (counts for --dry-run), fingerprint; no torch."""
    from tmdcli.artifacts.store import STAGING_PREFIX
    from tmdcli.data.expanders import DEFAULT_MODEL, resolve_expander
    from tmdcli.data.prompt_sources import (
        apply_filters,
        load_vbench_prompts,
        parse_source,
        read_source,
        source_identity,
    )

    check_config(cfg)
    try:
        spec = parse_source(cfg.source)
    except UsageError as exc:
        if not store.plan_missing_inputs or "does not exist" not in exc.message:
            raise
        spec = None  # a dry run before the user downloaded the file: shown in the plan below
        missing_source = exc
    toy = spec is not None and spec.kind == "toy"
    expander = cfg.expander.strip() if cfg.expander and cfg.expander.strip() != "auto" else (
        "toy" if toy else DEFAULT_MODEL)
    cfg = dataclasses.replace(cfg, expander=expander)
    blocked = []  # in a dry run, a missing source file or expander model is shown in the plan, not an error
    try:
        ref = resolve_expander(expander, backend=cfg.backend, toy_source=toy)
    except UsageError as exc:
        if not store.plan_missing_inputs:
            raise
        blocked.append(("expander", f"NOT AVAILABLE: {exc.message}" + (f" ({exc.hint})" if exc.hint else "")))
    if spec is None:
        blocked.append(("source", f"NOT AVAILABLE: {missing_source.message}"
                                  + (f" ({missing_source.hint})" if missing_source.hint else "")))
    else:
        table = read_source(spec, seed=cfg.seed, two_object_prob=cfg.toy_two_object_prob)
    if blocked:
        rows = [*blocked, ("note", "a real run stops here with exit 2 until the above is fixed; the later plans "
                                   "assume the prompts exist")]
        return Plan.build(store, stage=STAGE, stage_version=STAGE_VERSION, kind=OUTPUT_KIND, cfg=cfg,
                          name=cfg.name, rows=rows)
    vbench = load_vbench_prompts(cfg.vbench_prompts) if (cfg.drop_vbench and not toy) else None
    prepared = apply_filters(table, filter_config(cfg), vbench, toy=toy)
    if len(prepared) == 0:
        counts = ", ".join(f"{k} -{v}" for k, v in prepared.dropped().items() if v)
        raise UsageError(f"no prompt of {spec.describe()} survives the filters ({counts or 'the source is empty'})",
                         hint="loosen --min-words/--max-words/--nsfw-threshold, or check the source file")
    external = [source_identity(spec), ref.identity] + ([vbench.identity] if vbench is not None else [])

    n = len(prepared)
    num_chunks = math.ceil(n / cfg.chunk_size)
    rows = [("source", f"{spec.describe()}: {prepared.num_source_rows} rows")]
    if prepared.steps:
        rows.append(("filters", ", ".join(f"{s.step} -{s.dropped}" for s in prepared.steps)))
    rows += [("note", note) for note in prepared.notes]
    rows.append(("prompts", f"{n} (ids 0..{n - 1}, seeds {cfg.seed}..{cfg.seed + n - 1})"))
    if ref.is_lm:
        rows.append(("expander", f"{ref.label} via {cfg.backend} ({ref.path})"))
        calls = sum(math.ceil(min(cfg.chunk_size, n - k * cfg.chunk_size) / cfg.batch_size)
                    for k in range(num_chunks))
        retry = f"; up to {cfg.max_retries}x more calls for retries" if cfg.do_sample and cfg.max_retries else ""
        rows.append(("estimate", f"{calls} generate calls x {cfg.max_new_tokens} max new tokens "
                                 f"(<= {n * cfg.max_new_tokens} new tokens{retry}); "
                                 f"{'sampled' if cfg.do_sample else 'greedy'}, batch {cfg.batch_size}"))
    else:
        rows.append(("expander", f"{ref.label} (no model calls)"))
    result = Plan.build(store, stage=STAGE, stage_version=STAGE_VERSION, kind=OUTPUT_KIND, cfg=cfg,
                        external_models=external, name=cfg.name, rows=rows,
                        facts={"resolved": _Resolved(spec=spec, ref=ref, prepared=prepared, is_vidprom=table.is_vidprom,
                                                     vbench_origin=vbench.origin if vbench else None)})
    staging_dir = store.home / OUTPUT_KIND / f"{STAGING_PREFIX}{result.output_id}"  # read only: plan writes nothing
    done = sum(1 for k in range(num_chunks) if (staging_dir / chunk_name(k)).is_file())
    result.rows.append(("chunks", f"{num_chunks} of up to {cfg.chunk_size} prompts"
                                  + (f", {done} already done (resumes)" if done else "")))
    return result


# --------------------------------------------------------------------------------------------------------------
# run


def _chunk_table(ids: range, prepared, results, label: str, seeds: list[int]):
    import pyarrow as pa

    lo, hi = ids.start, ids.stop
    return pa.table({
        "id": pa.array(list(ids), pa.int64()),
        "source_prompt": pa.array(prepared.texts[lo:hi], pa.string()),
        "prompt": pa.array([r.text for r in results], pa.string()),
        "expander": pa.array([label] * (hi - lo), pa.string()),
        "seed": pa.array(seeds[lo:hi], pa.int64()),
        "spec": pa.array(prepared.specs[lo:hi], pa.string()),
        "source_key": pa.array(prepared.keys[lo:hi], pa.string()),
        "status": pa.array([r.status for r in results], pa.string()),
    })


def _write_parquet(staging, relpath: str, table) -> None:
    import pyarrow.parquet as pq

    with staging.atomic_path(relpath) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def run(cfg: MakePromptsConfig, plan: Plan, staging, rt):
    """Expand this worker's missing chunks; whoever finds every chunk present merges and commits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tmdcli.data.expanders import build_expander
    from tmdcli.runtime.dist import device_for, my_shards
    from tmdcli.runtime.log import Progress

    resolved: _Resolved = plan.facts["resolved"]
    prepared, ref = resolved.prepared, resolved.ref
    n, size = len(prepared), cfg.chunk_size
    num_chunks = math.ceil(n / size)
    seeds = [prompt_seed(cfg.seed, i) for i in range(n)]
    settings = generation_settings(cfg)

    # -- expand the chunks this worker owns and has not written yet
    mine = my_shards(num_chunks, rt.worker, rt.num_workers)
    todo = [k for k in mine if not staging.has(chunk_name(k))]
    compute = None
    if todo:
        device = "cpu"
        if ref.is_lm:
            device = device_for(rt.device, rt.dist)
            rt.console.print(f"  loading {ref.label} from {ref.path} on {device}")
        expander = build_expander(ref, settings, backend=cfg.backend, device=device, dtype=cfg.dtype,
                                  seed=cfg.seed)
        compute = expander.compute
        done = sum(min(size, n - k * size) for k in mine if k not in todo)
        progress = Progress(total=sum(min(size, n - k * size) for k in mine), desc="make-prompts",
                            unit="prompts", enabled=rt.is_main, done=done)
        for k in todo:
            ids = range(k * size, min(n, (k + 1) * size))
            results = expander.expand(prepared.texts[ids.start:ids.stop], seeds[ids.start:ids.stop])
            if len(results) != len(ids):
                raise AssertionError(f"expander returned {len(results)} results for {len(ids)} prompts")
            _write_parquet(staging, chunk_name(k), _chunk_table(ids, prepared, results, ref.label, seeds))
            progress.update(len(ids))
        progress.close()

    # -- merge and commit once every chunk is present
    missing = [k for k in range(num_chunks) if not staging.has(chunk_name(k))]
    if missing:
        print(f"{len(missing)} of {num_chunks} chunks are still being written by other workers", file=sys.stderr)
        return None
    try:
        if not staging.has(PROMPTS_FILE):
            merged = pa.concat_tables([pq.read_table(staging.path / chunk_name(k)) for k in range(num_chunks)])
            if merged.column("id").to_pylist() != list(range(n)):
                raise AssertionError(f"chunks in {staging.path} do not hold ids 0..{n - 1}")
            _write_parquet(staging, PROMPTS_FILE, merged.select(list(COLUMNS)))
        statuses = pq.read_table(staging.path / PROMPTS_FILE, columns=["status"]).column("status").to_pylist()
        return staging.commit(stats=_stats(cfg, prepared, statuses, num_chunks),
                              facts=_facts(cfg, resolved, n, compute))
    except OSError:
        # Another worker committed (renaming the staging folder) while this one was merging.
        from tmdcli.artifacts.store import load_artifact

        if (staging.final_path / "manifest.json").is_file():
            return load_artifact(staging.final_path)
        raise


def _stats(cfg: MakePromptsConfig, prepared, statuses: list[str], num_chunks: int) -> dict:
    counts = Counter(statuses)
    fallback = {s.split(":", 1)[1]: c for s, c in sorted(counts.items()) if s.startswith("fallback:")}
    return {
        "num_source_rows": prepared.num_source_rows,
        "filters": [s.to_dict() for s in prepared.steps],
        "dropped": prepared.dropped(),
        "filter_notes": list(prepared.notes),
        "num_prompts": len(statuses),
        "num_chunks": num_chunks,
        "status_counts": dict(sorted(counts.items())),
        "num_rewritten": counts.get("expanded", 0) + counts.get("toy", 0),
        "num_fallback": sum(fallback.values()),
        "fallback_reasons": fallback,
    }


def _facts(cfg: MakePromptsConfig, resolved: _Resolved, n: int, compute: dict | None) -> dict:
    from tmdcli.data.expanders import SYSTEM_PROMPT_SHA256

    spec, ref = resolved.spec, resolved.ref
    if cfg.license:
        license_ = cfg.license
    elif resolved.is_vidprom:
        license_ = "CC-BY-NC-4.0 (VidProM)"
    elif spec.kind == "toy":
        license_ = "toy grammar (tmdcli)"
    else:
        license_ = "as the source file"
    facts = {"num_items": n, "source": spec.describe(), "expander": ref.label, "license": license_}
    if resolved.vbench_origin:
        facts["vbench_prompts"] = resolved.vbench_origin
    if cfg.provenance:
        facts["provenance"] = cfg.provenance
    if ref.is_lm:
        facts.update(backend=cfg.backend, model_path=str(ref.path), system_prompt_sha256=SYSTEM_PROMPT_SHA256,
                     sampling=generation_settings(cfg).sampling(), dtype=cfg.dtype)
        if compute:  # absent when this process only merged chunks that other runs wrote
            facts["compute"] = compute
        revision = (ref.identity or {}).get("revision")
        if revision:
            facts["model_revision"] = revision
    return facts


# --------------------------------------------------------------------------------------------------------------
# Reading the artifact (for later stages and tools)


def read_prompts(path: str | Path) -> list[dict]:
    """The rows of a prompts artifact folder (or of a prompts.parquet file), in id order."""
    path = Path(path)
    if path.is_dir():
        path = path / PROMPTS_FILE
    return read_prompts_table(path, path.parent.name).to_pylist()


def _damaged(path: Path, artifact_id: str, exc: Exception):
    """A prompts.parquet pyarrow cannot parse (truncated, overwritten): exit 1 naming the file, the artifact and
    the way back (DESIGN.md 3: a damaged input is refused naming the file)."""
    from tmdcli.errors import IntegrityError

    detail = (str(exc).splitlines() or [type(exc).__name__])[0].split("': ", 1)[-1]  # the path is said already
    return IntegrityError(f"{path} of prompts artifact {artifact_id} is damaged ({detail})",
                          hint=f"`tmd verify {artifact_id}` confirms it; delete {path.parent} and rerun the "
                               f"`tmd make-prompts` that made it (`tmd show {artifact_id}` prints its config)")


def read_prompts_table(path: Path, artifact_id: str, columns: Sequence[str] | None = None):
    """prompts.parquet as a pyarrow Table; a damaged file is an IntegrityError (exit 1), not a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, OSError) as exc:  # a missing file is the caller's check; OSError covers short reads
        raise _damaged(Path(path), artifact_id, exc) from None


def count_prompts(path: Path, artifact_id: str) -> int:
    """Rows in prompts.parquet from its footer alone (plans stay cheap); exit 1 when the footer is damaged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError) as exc:
        raise _damaged(Path(path), artifact_id, exc) from None
