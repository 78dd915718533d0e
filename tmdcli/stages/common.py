"""What every stage shares: config -> dict with identity fields, the Plan (cheap: resolves inputs and the output id,
imports no torch, writes nothing) and `execute()` (render the plan, stop on --dry-run, skip when up to date, run).

A stage module defines STAGE, STAGE_VERSION, OUTPUT_KIND, a frozen config dataclass, `plan(cfg, store) -> Plan` and
`run(cfg, plan, staging, rt) -> Artifact | None` (None: this worker did its share and another worker commits).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tmdcli.artifacts.fingerprint import fingerprint_hex, stage_fingerprint
from tmdcli.artifacts.store import Artifact, Staging, Store
from tmdcli.runtime.dist import DistInfo, dist_info, worker_slot

NOT_IDENTITY = {"identity": False}  # field(metadata=NOT_IDENTITY): recorded in the manifest, not fingerprinted


def config_dict(cfg) -> dict:
    """The resolved config as JSON-friendly data (Paths as strings)."""
    def convert(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return {f.name: convert(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def identity_dict(cfg) -> dict:
    """Only the fields that change the result (STYLE.md 3.4: worker counts, intervals, paths are not identity)."""
    full = config_dict(cfg)
    return {f.name: full[f.name] for f in dataclasses.fields(cfg) if f.metadata.get("identity", True)}


@dataclass
class Plan:
    """A resolved stage invocation: inputs, output id and path, and what --dry-run shows."""

    stage: str
    stage_version: int
    kind: str
    config: dict
    identity: dict
    inputs: list[tuple[str, Artifact]]
    external_models: list[dict]
    name: str | None
    fingerprint: str
    output_id: str
    output_path: Path
    complete: bool
    rows: list[tuple[str, str]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, store: Store, *, stage: str, stage_version: int, kind: str, cfg, inputs: Sequence = (),
              external_models: Sequence[dict] = (), name: str | None = None, rows: Sequence = (),
              facts: dict | None = None) -> "Plan":
        identity = identity_dict(cfg)
        fp = stage_fingerprint(stage, stage_version, identity, [a.fingerprint for _, a in inputs],
                               [dict(m) for m in external_models])
        output_id = f"{kind}-{fingerprint_hex(fp)[:12]}"
        output_path = store.home / kind / output_id
        return cls(stage=stage, stage_version=stage_version, kind=kind, config=config_dict(cfg), identity=identity,
                   inputs=list(inputs), external_models=[dict(m) for m in external_models], name=name,
                   fingerprint=fp, output_id=output_id, output_path=output_path,
                   complete=(output_path / "manifest.json").is_file(), rows=list(rows), facts=dict(facts or {}))

    def begin(self, store: Store, writer: str = "shared") -> Staging:
        return store.begin(kind=self.kind, stage=self.stage, stage_version=self.stage_version, config=self.config,
                           identity_config=self.identity, inputs=self.inputs, external_models=self.external_models,
                           name=self.name, writer=writer)


@dataclass
class Runtime:
    """What a stage's run() gets from outside: where it speaks, which worker it is, the device string."""

    console: Any
    dist: DistInfo
    worker: int
    num_workers: int
    device: str = "auto"

    @property
    def is_main(self) -> bool:
        return self.worker == 0


def render_plan(plan: Plan, console) -> None:
    status = "up to date" if plan.complete else "would run"
    if any(getattr(a, "planned", False) for _, a in plan.inputs):
        console.print(f"[bold]{plan.stage}[/bold] -> new {plan.kind} (would run; its id is known once its inputs "
                      f"exist)")
    else:
        console.print(f"[bold]{plan.stage}[/bold] -> {plan.output_id} ({status})")
    for role, artifact in plan.inputs:
        console.print(f"  input {role}: {artifact.id}")
    for key, value in plan.rows:
        console.print(f"  {key}: {value}", markup=False)  # values are data: `tmdcli[plot]` is not a style tag
    if not any(getattr(a, "planned", False) for _, a in plan.inputs):
        console.print(f"  output: {plan.output_path}")


def writer_role(stage, info: DistInfo) -> str:
    """How this process writes the stage's staging folder (Store.begin): data-parallel stages share it shard by
    shard; a single-writer stage (training, eval) is written by rank 0 alone, and a second run is refused."""
    if getattr(stage, "DATA_PARALLEL", True):
        return "shared"
    return "only" if info.is_main else "none"


def execute(stage, cfg, *, home: Path, dry_run: bool = False, shard: str | None = None, device: str = "auto",
            show_config: bool = False, verify_inputs: bool = True) -> Artifact | None:
    """Plan, render, and (unless --dry-run or up to date) run a stage; print the artifact path on stdout.

    Before running, the inputs are checked against their manifests (sizes always, sha256 unless `verify_inputs` is
    False); the run holds the staging lock (artifacts/locks.py) and the recording SIGINT handler
    (runtime/interrupts.py), so an interrupt always ends in exit 130 with the staging folder kept for a resume.
    """
    from tmdcli.artifacts import verify_inputs as checks
    from tmdcli.runtime import interrupts
    from tmdcli.runtime.log import console as make_console

    info = dist_info()
    worker, num_workers = worker_slot(shard, info)
    console = make_console(enabled=info.is_main)
    store = Store(home)
    store.plan_missing_inputs = dry_run  # a recipe's DRY_RUN plans every stage before any input exists
    plan = stage.plan(cfg, store)
    render_plan(plan, console)
    if show_config or dry_run:
        console.print("  config: " + ", ".join(f"{k}={v}" for k, v in plan.config.items()))
    if dry_run:
        return None
    if plan.complete:
        artifact = store.resolve(str(plan.output_path))
        if info.is_main:
            print(artifact.path)
        return artifact
    checks.verify_inputs(store.home, plan.inputs, hashes=verify_inputs)
    rt = Runtime(console=console, dist=info, worker=worker, num_workers=num_workers, device=device)
    with interrupts.guard():
        staging = plan.begin(store, writer_role(stage, info))
        try:
            artifact = staging.artifact if staging.complete else stage.run(cfg, plan, staging, rt)
        finally:
            staging.release()
    if artifact is not None and artifact.path.parent.parent == store.home:
        checks.remember_committed(store.home, artifact)
    if artifact is not None and info.is_main:
        print(artifact.path)
    elif artifact is None and num_workers > 1 and getattr(stage, "DATA_PARALLEL", True):
        print(f"worker {worker}/{num_workers}: my shards are done; the last worker to finish commits {plan.output_id}",
              file=sys.stderr)
    return artifact
