"""Training steps/s per phase of one `python -m tmdcli.toy.train` run folder, as one JSON line (issue 16's
"measure steps/s before and after"): scripts/gpu_check.sh records it after its toy training, labelled with the
commit, so the rate of the current code and of a faster one can be set side by side.

    python -m tmdcli.toy.throughput OUT [LABEL]    # reads OUT/bundle/metrics.json, else OUT/ckpt/*/state.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BATCH_KEYS = {"vae": ("vae_batch", "vae_image_batch"), "teacher": ("batch",)}


def phase_rates(run_dir: str | Path) -> dict[str, Any]:
    """Per phase: steps and wall seconds of this run, their ratio (mean steps/s, start-up included) and the rate
    the phase logged last; from the finished bundle's metrics.json, or from the checkpoints of a run cut short."""
    run = Path(run_dir)
    metrics_file = run / "bundle" / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        phases, config, device = metrics.get("training", {}), metrics.get("config", {}), metrics.get("device")
    else:  # killed before its bundle: the checkpoints still say how far each phase got
        phases = {p: json.loads(f.read_text()) for p in ("vae", "teacher")
                  if (f := run / "ckpt" / p / "state.json").is_file()}
        for p in phases:
            phases[p].update(steps_this_run=phases[p].get("step"), wall_s=phases[p].get("elapsed_s"))
        config_file = run / "ckpt" / "config.json"
        config, device = (json.loads(config_file.read_text()) if config_file.is_file() else {}), None
    out: dict[str, Any] = {"device": device}
    for phase in ("vae", "teacher"):
        info = phases.get(phase) or {}
        steps, wall = info.get("steps_this_run"), info.get("wall_s")
        out[phase] = dict(steps=steps, wall_s=wall, logged_steps_per_s=info.get("steps_per_s"),
                          mean_steps_per_s=(steps / wall) if steps and wall else None,
                          **{k: config.get(k) for k in BATCH_KEYS[phase]})
    return out


def main(argv: list[str]) -> int:
    if not argv or not Path(argv[0]).is_dir():
        print("usage: python -m tmdcli.toy.throughput RUN_DIR [LABEL]  (RUN_DIR: a toy training --out folder)",
              file=sys.stderr)
        return 2
    print(json.dumps(dict(label=argv[1] if len(argv) > 1 else None, **phase_rates(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
