"""The `tmd` command: thin Typer wrappers over library functions, shared options, one error handler.

Stdout carries only results (paths, ids, JSON); logs, plans and progress go to stderr. Exit codes: 0 success,
1 failure, 2 usage or bad input, 130 interrupted. `TMD_DEBUG=1` shows tracebacks.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tmdcli import __version__
from tmdcli.errors import TmdError, UsageError

app = typer.Typer(name="tmd", no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_show_locals=False,
                  add_completion=True, help="Transition Matching Distillation for Wan2.1 text-to-video models.")

# --- shared options (declared once) ---------------------------------------------------------------------------
HomeOpt = Annotated[Path, typer.Option("--home", envvar="TMD_HOME", show_envvar=True,
                                       help="Workspace that holds all artifacts.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", "-n", help="Print the plan and exit without writing anything.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Base seed; sample i uses seed + i.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda if present), cpu, cuda, cuda:1 ...")]
DtypeOpt = Annotated[str, typer.Option("--dtype", envvar="TMD_DTYPE", show_envvar=True,
                                       help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
DEFAULT_HOME = Path("tmd-home")


def complete_ref(incomplete: str) -> list[str]:
    """Shell completion for artifact references: ids and names in $TMD_HOME (or ./tmd-home), plus `latest`."""
    from tmdcli.artifacts.store import Store

    try:
        artifacts = Store(os.environ.get("TMD_HOME", DEFAULT_HOME)).list()
    except Exception:  # completion must never crash the shell
        return []
    refs = ["latest"] + [a.id for a in artifacts] + [a.name for a in artifacts if a.name != a.id]
    return [r for r in refs if r.startswith(incomplete)]


RefArg = Annotated[str, typer.Argument(help="Artifact id, name, latest, KIND:latest, or path.",
                                       autocompletion=complete_ref)]


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def guarded(fn):
    """Turn known errors into `error:`/`hint:` lines and exit codes; tracebacks only with TMD_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = os.environ.get("TMD_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except TmdError as exc:
            if debug:
                raise
            _report(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _report("interrupted; rerun the same command to resume", None)
            raise typer.Exit(130) from None
        except Exception as exc:
            if debug:
                raise
            _report(f"{type(exc).__name__}: {exc}", "this is a bug or an environment problem; rerun with "
                                                    "TMD_DEBUG=1 for the traceback")
            raise typer.Exit(1) from None

    return wrapper


def _report(message: str, hint: str | None) -> None:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def _version_callback(value: bool):
    if value:
        print(f"tmd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                                help="Print the version and exit.")] = False):
    """Transition Matching Distillation for Wan2.1 text-to-video models.

    Stages: make-prompts, synth-videos, encode-latents, pretrain-head, distill, sample, eval.
    """


# --- make-prompts (data stage 1) --------------------------------------------------------------------------------
# (command defined here)

# --- synth-videos and encode-latents (data stages 2 and 3) --------------------------------------------------------
# (commands defined here)

# --- sample ---------------------------------------------------------------------------------------------------

@app.command(epilog="Examples:\n\n  tmd sample \"a cat surfing\"\n\n"
                    "  tmd sample \"a red circle moving left on a gray background\" --model toy --out clip.mp4\n\n"
                    "  tmd sample --prompts-file prompts.txt --model latest --out clips/\n\n"
                    "  tmd sample \"a cat surfing\" --model tiny-random --m 2 --n 2 --h 1   (student at init)")
@guarded
def sample(
    prompt: Annotated[Optional[str], typer.Argument(help="The text prompt.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="Student reference (id, name, latest, path) or a teacher "
                                                      "name/folder; default: the newest student.",
                                                 autocompletion=complete_ref)] = None,
    out: Annotated[Optional[Path], typer.Option(help="mp4 file (one prompt) or folder (several).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="Text file, one prompt per line (batched).")] = None,
    seed: SeedOpt = 0,
    frames: Annotated[Optional[int], typer.Option(help="Frames (4k+1); default: the teacher's.")] = None,
    height: Annotated[Optional[int], typer.Option(help="Height in pixels; default: the teacher's.")] = None,
    width: Annotated[Optional[int], typer.Option(help="Width in pixels; default: the teacher's.")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 4,
    m: Annotated[Optional[int], typer.Option("--m", help="With a teacher: sample a TMD student built from it at "
                                                        "init with M outer steps (speed checks).")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Inner steps N (with a student: overrides training's).")]
    = None,
    h: Annotated[Optional[int], typer.Option("--h", help="With a teacher: head blocks H of the init student.")]
    = None,
    steps: Annotated[Optional[int], typer.Option(help="Teacher sampler steps; default: the teacher's (50).")] = None,
    cfg: Annotated[Optional[float], typer.Option(help="Teacher CFG scale; default: the teacher's (5).")] = None,
    home: HomeOpt = DEFAULT_HOME,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
):
    """Generate videos with a student (TMD Algorithm 1) or a teacher (its own 50-step CFG sampler).

    Prints the mp4 path(s) on stdout; the effective NFE and the time split (text encoder, transformer, VAE decode)
    on stderr.
    """
    from tmdcli.stages import sample as stage

    request = stage.SampleRequest(prompt=prompt, prompts_file=prompts_file, model=model, out=out, seed=seed,
                                  num_frames=frames, height=height, width=width, batch_size=batch_size,
                                  num_outer_steps=m, num_inner_steps=n, num_head_blocks=h, num_steps=steps,
                                  guidance_scale=cfg, home=home, device=device, dtype=dtype)
    plan = stage.plan(request)
    console = _stderr()
    stage.render_plan(plan, console)
    if dry_run:
        return
    result = stage.run(plan, console)
    if json_out:
        print(json.dumps(result.to_dict()))
    else:
        for path in result.paths:
            print(path)


# --- inspection -----------------------------------------------------------------------------------------------
@app.command("ls", epilog="Examples:\n\n  tmd ls\n\n  tmd ls student --json")
@guarded
def list_artifacts(
    kind: Annotated[Optional[str], typer.Argument(help="Only this kind: prompts, videos, latents, student, eval.")]
    = None,
    home: HomeOpt = DEFAULT_HOME,
    json_out: JsonOpt = False,
):
    """List the complete artifacts in the home, newest first."""
    from tmdcli.artifacts.store import KINDS, Store

    if kind is not None and kind not in KINDS:
        raise UsageError(f"unknown artifact kind {kind!r}", hint=f"one of: {', '.join(KINDS)}")
    artifacts = Store(home).list(kind)
    if json_out:
        print(json.dumps([{"id": a.id, "kind": a.kind, "name": a.name, "created_at": a.created_at,
                           "path": str(a.path)} for a in artifacts]))
        return
    if not artifacts:
        print(f"no artifacts in {home}", file=sys.stderr)
        return
    from rich.table import Table

    table = Table("id", "name", "stage", "created", "facts", box=None)
    for a in artifacts:
        facts = a.manifest.facts or {}
        brief = ", ".join(f"{k}={facts[k]}" for k in ("teacher", "method", "effective_nfe", "num_items")
                          if k in facts)
        table.add_row(a.id, a.name if a.name != a.id else "", a.manifest.stage, a.created_at[:19], brief)
    from rich.console import Console

    Console(highlight=False).print(table)


@app.command(epilog="Examples:\n\n  tmd show latest\n\n  tmd show student:latest --json")
@guarded
def show(
    ref: RefArg,
    home: HomeOpt = DEFAULT_HOME,
    json_out: JsonOpt = False,
):
    """Show an artifact: manifest, lineage back to the prompt source, facts and metrics."""
    from tmdcli.artifacts.store import Store

    store = Store(home)
    artifact = store.resolve(ref)
    manifest = artifact.manifest.to_dict()
    lineage = [{"id": a.id, "kind": a.kind, "missing": bool(a.missing)} for a in store.lineage(artifact)]
    if json_out:
        print(json.dumps({"path": str(artifact.path), "manifest": manifest, "lineage": lineage}, indent=2))
        return
    out = [f"{artifact.id}  ({artifact.kind}, stage {manifest['stage']} v{manifest['stage_version']})",
           f"  name:     {artifact.name}", f"  path:     {artifact.path}", f"  created:  {manifest['created_at']}",
           f"  files:    {len(manifest['files'])} ({sum(f['bytes'] for f in manifest['files']) / 2**20:.2f} MiB)"]
    for key, value in sorted((manifest.get("facts") or {}).items()):
        if key != "report_table":
            out.append(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    for key, value in sorted((manifest.get("stats") or {}).items()):
        out.append(f"  stats.{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if lineage:
        out.append("  lineage:  " + " <- ".join([artifact.id] + [a["id"] + (" (missing)" if a["missing"] else "")
                                                                  for a in lineage]))
    table = (manifest.get("facts") or {}).get("report_table")
    if table:
        out += ["", table]
    print("\n".join(out))


@app.command(epilog="Example:\n\n  tmd verify latents:latest")
@guarded
def verify(
    ref: RefArg,
    home: HomeOpt = DEFAULT_HOME,
):
    """Recompute every file's sha256 and size against the manifest; exit 1 naming each bad file."""
    from tmdcli.artifacts.store import Store
    from tmdcli.errors import IntegrityError

    store = Store(home)
    artifact = store.resolve(ref)
    problems = store.verify(artifact)
    if problems:
        for problem in problems:
            print(f"bad: {problem}", file=sys.stderr)
        raise IntegrityError(f"{artifact.id}: {len(problems)} file(s) do not match the manifest",
                             hint="regenerate the artifact (delete its folder and rerun the stage)")
    print(f"ok: {artifact.id} ({len(artifact.manifest.files)} files)", file=sys.stderr)
    print(artifact.id)


def main() -> None:
    app()
