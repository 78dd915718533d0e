"""Markdown table of the students in a home (used by recipes/toy-paper.sh): name, stage and what defines each."""

import json
import sys
from pathlib import Path

rows = ["| name | stage | method | M | N | H | objective | u | rollout | KD | effective NFE |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
for entry in sorted(json.load(sys.stdin), key=lambda e: e["created_at"]):
    manifest = json.loads((Path(entry["path"]) / "manifest.json").read_text())
    f = manifest.get("facts", {})
    rows.append(f"| {entry['name']} | {manifest['stage']} | {f.get('method', '')} | {f.get('num_outer_steps', '')} | "
                f"{f.get('num_inner_steps', '')} | {f.get('num_head_blocks', '')} | {f.get('objective', '')} | "
                f"{f.get('u_param') or ''} | "
                f"{f.get('rollout', '')} | {f.get('kd_warmup', '')} | {f.get('effective_nfe', 0):.3g} |")
print("\n".join(rows))
