"""Run VBench in its own Python environment (EVAL.md 2.1, 2.7, 7.3): preflight, command, subprocess.

VBench pins transformers 4.33 and numpy<2 and needs detectron2 built for one CUDA, so tmdcli never imports it: a
separate interpreter (`--vbench-python`, env TMD_VBENCH_PYTHON) runs `vbench_driver.py`, one dimension per process,
offline, with the weights under $VBENCH_CACHE_DIR. The preflight finds every missing piece before any video is made.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from tmdcli.errors import StageError, UsageError
from tmdcli.evaluation.vbench import MODULES, missing_requirements

DRIVER = Path(__file__).with_name("vbench_driver.py")
PROBE_TIMEOUT_S = 120

# Runs in the VBench interpreter: find modules without importing them (importing vbench loads torch and models).
_PROBE = r"""
import importlib.metadata, importlib.util, json, os, sys
out = {"python": sys.version.split()[0], "missing_modules": []}
spec = importlib.util.find_spec("vbench")
if spec is None or spec.origin is None:
    out["vbench"] = None
else:
    try:
        out["vbench"] = importlib.metadata.version("vbench")
    except importlib.metadata.PackageNotFoundError:
        out["vbench"] = "unknown (not installed as a distribution)"
    out["full_info"] = os.path.join(os.path.dirname(spec.origin), "VBench_full_info.json")
for name in sys.argv[1:]:
    if importlib.util.find_spec(name) is None:
        out["missing_modules"].append(name)
print(json.dumps(out))
"""


@dataclass(frozen=True)
class VBenchEnv:
    """Where VBench runs and where it finds its weights."""

    python: str
    cache_dir: Path  # $VBENCH_CACHE_DIR
    torch_home: Path  # $TORCH_HOME (DINO's hub copy)
    hf_home: Path  # $HF_HOME (bert-base-uncased)

    @property
    def roots(self) -> dict[str, Path]:
        return {"cache": self.cache_dir, "torch": self.torch_home, "hf": self.hf_home / "hub"}


def vbench_env(python: str | None, cache_dir: str | None, environ: Mapping[str, str] = os.environ) -> VBenchEnv:
    """Resolve the interpreter and the weight folders from options, then VBench's own variables and defaults."""
    if not python:
        raise UsageError("--suite vbench needs the Python of a VBench environment",
                         hint="pass --vbench-python /path/to/venv/bin/python or set TMD_VBENCH_PYTHON "
                              "(EVAL.md 2.7 describes the offline environment)")
    home = Path(environ.get("HOME", "~")).expanduser()
    return VBenchEnv(
        python=python,
        cache_dir=Path(cache_dir or environ.get("VBENCH_CACHE_DIR") or home / ".cache" / "vbench").expanduser(),
        torch_home=Path(environ.get("TORCH_HOME") or home / ".cache" / "torch").expanduser(),
        hf_home=Path(environ.get("HF_HOME") or home / ".cache" / "huggingface").expanduser())


@dataclass(frozen=True)
class Preflight:
    python_version: str
    vbench_version: str
    full_info: Path


def preflight(env: VBenchEnv, dimensions: Sequence[str], full_info: str | Path | None = None) -> Preflight:
    """Check the interpreter, the vbench package, extra modules and every weight file; exit 2 listing what is missing.

    Never downloads anything (VBench itself would, silently, for several files).
    """
    python = Path(env.python).expanduser()
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise UsageError(f"VBench interpreter {env.python} is not an executable file",
                         hint="point --vbench-python (or TMD_VBENCH_PYTHON) at the `python` of the VBench venv")
    modules = sorted({m for d in dimensions for m in MODULES.get(d, ())})
    info = probe(env, modules)
    problems = []
    if info.get("vbench") is None:
        problems.append(f"python module vbench: not importable by {env.python} (pip install vbench==0.1.5 there)")
    problems += [f"python module {m}: not importable by {env.python} (detectron2 is built from source, "
                 f"EVAL.md 2.1)" for m in info.get("missing_modules", [])]
    info_path = Path(full_info) if full_info is not None else (Path(info["full_info"]) if info.get("full_info")
                                                               else None)
    if info_path is not None and not info_path.is_file():
        problems.append(f"VBench prompt list: {info_path} (ships inside the vbench package)")
    problems += missing_requirements(dimensions, env.roots)
    if problems:
        raise UsageError(f"the VBench environment is incomplete ({len(problems)} missing):\n  - "
                         + "\n  - ".join(problems),
                         hint=f"put the weights under {env.cache_dir} (or --vbench-cache DIR), DINO's copy under "
                              f"{env.torch_home}/hub/checkpoints and bert-base-uncased in {env.hf_home}/hub; "
                              f"nothing is downloaded for you (EVAL.md 2.2 and 2.7)")
    return Preflight(python_version=info["python"], vbench_version=info["vbench"], full_info=info_path)


def probe(env: VBenchEnv, modules: Sequence[str] = ()) -> dict:
    """Ask the VBench interpreter which modules it has (a second or two; nothing heavy is imported)."""
    try:
        proc = subprocess.run([env.python, "-c", _PROBE, *modules], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, env=driver_environ(env))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"cannot run the VBench interpreter {env.python}: {exc}") from exc
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr or proc.stdout).strip()[-500:]
        raise UsageError(f"{env.python} is not a working Python (exit {proc.returncode}): {tail}") from None


def driver_environ(env: VBenchEnv, base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The subprocess environment: VBench's weight folders, and offline switches so nothing is fetched."""
    out = {k: v for k, v in base.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # ours must not leak in
    out.update(VBENCH_CACHE_DIR=str(env.cache_dir), TORCH_HOME=str(env.torch_home), HF_HOME=str(env.hf_home),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return out


def driver_command(env: VBenchEnv, *, videos: Path, full_info: Path, dimension: str, out_dir: Path, name: str,
                   device: str) -> list[str]:
    """`python vbench_driver.py ...`: one dimension, local checkpoints, standard mode."""
    return [env.python, str(DRIVER), "--videos", str(videos), "--full-info", str(full_info), "--dimension",
            dimension, "--out", str(out_dir), "--name", name, "--device", device,
            "--raft", str(env.cache_dir / "raft_model" / "models" / "raft-things.pth")]


def run_dimension(env: VBenchEnv, *, videos: Path, full_info: Path, dimension: str, out_dir: Path, name: str,
                  device: str = "cuda") -> dict:
    """Run one dimension to completion and return VBench's result JSON object (raises StageError on failure)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / f"{name}.log"
    command = driver_command(env, videos=videos, full_info=full_info, dimension=dimension, out_dir=out_dir,
                             name=name, device=device)
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=driver_environ(env))
    result = out_dir / f"{name}_eval_results.json"
    if proc.returncode != 0 or not result.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        raise StageError(f"VBench failed on {dimension} (exit {proc.returncode}); last lines of {log}:\n"
                         + "\n".join(tail), hint="fix the VBench environment and rerun: finished dimensions are kept")
    return json.loads(result.read_text(encoding="utf-8"))
