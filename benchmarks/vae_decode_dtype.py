"""Wan2.1 VAE decode time at 81x480x832 (latent 16x21x60x104) in float32 and bfloat16, random weights.

    python benchmarks/vae_decode_dtype.py --device cuda --out vae_decode.json

Why: the fp32 decode (about 2.8 s on an H200) dominates a few-step student end to end; this measures what bf16 buys.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from _common import timed  # noqa: E402 (benchmarks/ is on sys.path when run as a script)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--latent-frames", type=int, default=21, help="21 for 81 frames; 1-2 for a CPU smoke run")
    p.add_argument("--latent-size", type=int, nargs=2, default=(60, 104))
    args = p.parse_args(argv)
    from diffusers import AutoencoderKLWan

    device = torch.device(args.device)
    torch.manual_seed(0)
    latent = torch.randn(1, 16, args.latent_frames, *args.latent_size, device=device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "runs": {}}
    reference = None
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(1)  # the same random weights for both dtypes
        with torch.device(device):
            vae = AutoencoderKLWan().eval().to(dtype)
        with torch.no_grad():
            vae.decode(latent[:, :, :2].to(dtype))  # warm-up
            out, seconds = timed(lambda: vae.decode(latent.to(dtype)).sample.float(), device)
        if reference is None:
            reference = out
        name = str(dtype).replace("torch.", "")
        results["runs"][name] = {"decode_s": seconds, "max_abs_diff_vs_fp32": float((out - reference).abs().max()),
                                 "mean_abs_diff_vs_fp32": float((out - reference).abs().mean())}
        print(name, results["runs"][name], flush=True)
        del vae, out
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
