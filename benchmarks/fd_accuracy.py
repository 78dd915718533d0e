"""Accuracy of TM-MF's finite-difference total derivative against forward-mode AD (METHOD.md 11.2).

    python benchmarks/fd_accuracy.py --out docs/bench/fd_accuracy_cpu.json

For the tiny-random student, the trained toy teacher's student and a random model of the toy's architecture, in
float64 with the math attention kernel: the relative error ||FD - JVP|| / ||JVP|| of d/ds u(y_s, s, r) at several
steps delta, along the full tangent (v, 1), along y only (v, 0) and along time only (0, 1). The student's new
modules are perturbed away from their inert init (scale 0.05) so the fusion and the r-embedder take part.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tmdcli.models.student import StudentConfig, TMDStudent
from tmdcli.objectives.meanflow import average_velocity, finite_difference_total_derivative

DELTAS = (1e-4, 1e-3, 5e-3)


def make_student(transformer, num_head_blocks: int) -> TMDStudent:
    student = TMDStudent.from_teacher(transformer, StudentConfig(num_head_blocks=num_head_blocks), seed=0).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.extras.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return student


def errors(student, shape, text_dim) -> dict:
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x_t, y_s, y1, v, text = rand(2, *shape), rand(2, *shape), rand(2, *shape), rand(2, *shape), rand(2, 8, text_dim)
    t = torch.tensor([0.9, 0.5], dtype=torch.float64)
    s = torch.tensor([0.6, 0.3], dtype=torch.float64)
    r = torch.tensor([0.2, 0.1], dtype=torch.float64)
    out = {}
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        feats = student.backbone(x_t, t, text)

        def u_fn(y, s_in):
            return average_velocity(y1, student.head(y, s_in, r, feats))

        for name, (dy, ds) in {"full": (v, 1.0), "y_only": (v, 0.0), "time_only": (torch.zeros_like(v), 1.0)}.items():
            _, jvp = torch.func.jvp(u_fn, (y_s, s), (dy, torch.full_like(s, ds)))
            row = {}
            for delta in DELTAS:
                if ds == 0.0:  # the FD helper always moves s; emulate a y-only difference directly
                    fd = (u_fn(y_s + delta * dy, s) - u_fn(y_s - delta * dy, s)) / (2 * delta)
                else:
                    fd = finite_difference_total_derivative(u_fn, y_s, s, r, dy, delta)
                row[str(delta)] = float((fd - jvp).norm() / jvp.norm())
            out[name] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from diffusers import WanTransformer3DModel

    from tmdcli.models.tiny import build_tiny_components
    from tmdcli.registry import TOY_BUNDLE_DIR

    results = {"tiny-random (4 blocks, H=1)": errors(make_student(build_tiny_components(seed=0)["transformer"], 1),
                                                     (16, 3, 4, 4), 32)}
    toy = WanTransformer3DModel.from_pretrained(TOY_BUNDLE_DIR / "transformer")
    results["toy teacher, trained (12 blocks, H=5)"] = errors(make_student(toy, 5), (8, 5, 4, 4), 64)
    torch.manual_seed(0)
    results["toy architecture, random (H=5)"] = errors(make_student(WanTransformer3DModel(**dict(toy.config)), 5),
                                                       (8, 5, 4, 4), 64)
    for name, row in results.items():
        print(name, json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps({"benchmark": "fd_accuracy", "deltas": DELTAS, "relative_error": results},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
