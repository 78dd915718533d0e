"""Sampling speed: the teacher's 50-step CFG sampler against TMD students of several (M, N, H).

    python benchmarks/sample_speed.py --config tiny --out sample_speed_cpu.json                 # 2-core CPU
    python benchmarks/sample_speed.py --config wan1.3b --device cuda --out sample_speed_gpu.json  # full 1.3B shapes

Weights are random (no real checkpoint is needed: speed does not depend on the values). Reports, per model: the
effective NFE, transformer seconds, VAE-decode seconds, end-to-end seconds, and the measured transformer speed-up
against the teacher next to the one the effective NFE predicts (teacher NFE / student NFE). With
`--teacher-measure-steps K < --teacher-steps`, the teacher's transformer time is measured over K steps and scaled
to the full count (every step costs the same: two forward passes on the same shapes); the JSON says so.
The text encoder is not timed at full size (a random umT5-XXL would cost 11 GB for nothing): text embeddings are
random tensors of the real shape.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from _common import WAN13B_CONFIG, sync, timed  # noqa: E402,F401 (benchmarks/ is on sys.path when run as a script)

def build(config: str, device, dtype):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from tmdcli.models.tiny import build_tiny_components
    from tmdcli.models.wan import float32_rope

    torch.manual_seed(0)
    if config == "tiny":
        comps = build_tiny_components()
        transformer, vae = comps["transformer"].to(device), comps["vae"].to(device)
        text_shape, size = (32, 32), (9, 32, 32)
    else:
        with torch.device(device):
            transformer = WanTransformer3DModel(**WAN13B_CONFIG).eval()
            vae = AutoencoderKLWan().eval()  # the Wan2.1 VAE config (diffusers defaults)
        float32_rope(transformer)
        text_shape, size = (512, 4096), (81, 480, 832)
    if dtype != torch.float32:
        # fp32 master copy cast once; keeps the benchmark's compute dtype explicit
        transformer = transformer.to(dtype)
    transformer.requires_grad_(False)
    vae.requires_grad_(False)
    return transformer, vae, text_shape, size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "wan1.3b"], default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on cuda, fp32 on cpu")
    p.add_argument("--students", default="2,2,5;2,4,5;1,2,5;1,4,5;2,2,3",
                   help="M,N,H triples separated by ';' (H is capped at L-1 for tiny models)")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--teacher-measure-steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from tmdcli.models import wan
    from tmdcli.models.student import StudentConfig, TMDStudent
    from tmdcli.sampler import generators_for, randn_per_sample, sample_teacher, sample_tmd

    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    transformer, vae, text_shape, (frames, height, width) = build(args.config, device, dtype)
    num_blocks = len(transformer.blocks)
    shape = wan.latent_shape(vae, transformer.config, frames, height, width)
    text = torch.zeros(1, *text_shape, device=device, dtype=dtype)
    n_pos, n_neg = min(20, text_shape[0]), min(60, text_shape[0])  # real tokens, then zero padding (as Wan)
    text[:, :n_pos] = torch.randn(1, n_pos, text_shape[1], device=device, dtype=dtype)
    text_neg = torch.zeros_like(text)
    text_neg[:, :n_neg] = torch.randn(1, n_neg, text_shape[1], device=device, dtype=dtype)
    noise = randn_per_sample(shape, generators_for([0]), device=device)
    results = {"config": args.config, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
               "video": [frames, height, width], "latent": list(shape), "num_blocks": num_blocks,
               "tokens": shape[1] * (shape[2] // 2) * (shape[3] // 2), "models": []}

    # The split must reproduce the teacher's forward exactly at init, also at full size in bf16.
    with torch.no_grad():
        t_check = torch.full((1,), 0.7, device=device)
        reference = wan.velocity(transformer, noise.to(dtype), t_check, text)
        probe = TMDStudent.from_teacher(transformer, StudentConfig(num_head_blocks=min(5, num_blocks - 1))).to(device)
        feats = probe.backbone(noise, t_check.double(), text)
        split = probe.head(torch.randn_like(noise), t_check.double(), torch.zeros_like(t_check), feats)
        results["split_max_abs_diff"] = float((split.float() - reference.float()).abs().max())
        del probe, feats, split, reference
    if device.type == "cuda":
        results["sdpa_flash_enabled"] = torch.backends.cuda.flash_sdp_enabled()

    def velocity(x, t):
        return wan.guided_velocity(transformer, x.to(dtype), t, text, text_neg, args.cfg)

    # VAE decode: identical for every model (same latent shape); warm up once, then time.
    vae_latent = torch.randn(1, *shape, device=device)
    wan.vae_decode(vae, vae_latent[:, :, :1])
    _, vae_s = timed(lambda: wan.vae_decode(vae, vae_latent), device)
    results["vae_decode_s"] = vae_s
    if device.type == "cuda":
        results["vae_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    # Teacher: K measured steps (after one warm-up step), scaled to the full count when K < steps.
    k = args.teacher_measure_steps or args.teacher_steps
    sample_teacher(velocity, noise, num_steps=1, flow_shift=5.0)
    per_run = []
    for _ in range(1 if k > 10 or args.config != "tiny" else args.repeats):
        _, s = timed(lambda: sample_teacher(velocity, noise, num_steps=k, flow_shift=5.0), device)
        per_run.append(s)
    teacher_tf = min(per_run) * args.teacher_steps / k
    teacher_nfe = args.teacher_steps * (2 if args.cfg != 1 else 1)
    results["models"].append({"model": f"teacher {args.teacher_steps}x{2 if args.cfg != 1 else 1}",
                              "effective_nfe": teacher_nfe, "transformer_s": teacher_tf, "vae_s": vae_s,
                              "end_to_end_s": teacher_tf + vae_s, "measured_steps": k,
                              "extrapolated": k < args.teacher_steps})
    print(f"teacher: NFE {teacher_nfe}, transformer {teacher_tf:.3f} s (measured {k} steps), VAE {vae_s:.3f} s",
          flush=True)

    for triple in args.students.split(";"):
        m, n, h = (int(v) for v in triple.split(","))
        h = min(h, num_blocks - 1)
        student = TMDStudent.from_teacher(transformer, StudentConfig(num_outer_steps=m, num_inner_steps=n,
                                                                      num_head_blocks=h)).to(device)
        cfg = student.config
        run = lambda: sample_tmd(student, noise, text, outer_grid=cfg.outer_grid(),  # noqa: E731
                                 inner_grid=cfg.inner_grid(), generators=generators_for([0]))
        run()  # warm-up
        tf = min(timed(run, device)[1] for _ in range(args.repeats))
        nfe = student.effective_nfe
        row = {"model": f"TMD M{m} N{n} H{h}", "M": m, "N": n, "H": h, "effective_nfe": nfe, "transformer_s": tf,
               "vae_s": vae_s, "end_to_end_s": tf + vae_s, "transformer_speedup": teacher_tf / tf,
               "predicted_speedup": teacher_nfe / nfe, "end_to_end_speedup": (teacher_tf + vae_s) / (tf + vae_s)}
        results["models"].append(row)
        print(f"{row['model']}: NFE {nfe:.3f}, transformer {tf:.4f} s, speed-up {row['transformer_speedup']:.1f}x "
              f"(NFE predicts {row['predicted_speedup']:.1f}x), end to end {row['end_to_end_speedup']:.1f}x",
              flush=True)
    if device.type == "cuda":
        results["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    text_out = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text_out + "\n")
    print(text_out)


if __name__ == "__main__":
    main()
