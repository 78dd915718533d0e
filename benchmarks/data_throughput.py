"""Data-stage throughput: synth-videos (teacher sampling + VAE decode + mp4) and encode-latents (mp4 read + VAE
encode + text), per clip and in clips/hour, plus the training loader's read speed.

    python benchmarks/data_throughput.py --config tiny --out data_throughput_cpu.json                 # 2-core CPU
    python benchmarks/data_throughput.py --config wan1.3b --device cuda --out data_throughput_gpu.json  # 1.3B shapes

`tiny` runs the tiny-random teacher exactly as the stages do (its text encoder included), at its default size
(9x32x32) and sampler (50 steps x CFG). `wan1.3b` builds the Wan2.1 1.3B transformer and the Wan VAE with random
weights (speed does not depend on the values) at 81x480x832; the transformer time is measured over
`--measure-steps K` steps of the 50 x 2 NFE sampler and scaled to 50 (every step costs the same: two forward passes
on the same shapes); the JSON says so. The umT5-XXL text encoder is not built at full size (a random one costs 11 GB
for nothing; it runs once per prompt, and negligibly next to 100 transformer passes): text embeddings there are
random tensors of the real shape, and text time is reported as null.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import WAN13B_CONFIG, sync, timed  # noqa: E402,F401 (benchmarks/ is on sys.path when run as a script)

def build(config: str, device, dtype):
    """(transformer, vae, text_fn or None, text shape, video size, fps)."""
    from tmdcli.models import wan

    if config == "tiny":
        from tmdcli.registry import load_teacher

        teacher = load_teacher("tiny-random", device=str(device), dtype={torch.float32: "float32",
                                                                        torch.bfloat16: "bfloat16"}[dtype])
        d = teacher.defaults

        def text_fn(prompts):
            return wan.encode_text(teacher.tokenizer, teacher.text_encoder, prompts, d.max_sequence_length, device,
                                   dtype)

        return teacher.transformer, teacher.vae, text_fn, (d.max_sequence_length, 32), \
            (d.num_frames, d.height, d.width), d.fps
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        transformer = WanTransformer3DModel(**WAN13B_CONFIG).eval()
        vae = AutoencoderKLWan().eval()  # the Wan2.1 VAE config (diffusers defaults), fp32 as the stages run it
    wan.float32_rope(transformer)
    transformer = transformer.to(dtype).requires_grad_(False)
    vae.requires_grad_(False)
    return transformer, vae, None, (512, 4096), (81, 480, 832), 16


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "wan1.3b"], default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on cuda, fp32 on cpu")
    p.add_argument("--batch-size", type=int, default=None, help="clips per sampler batch (tiny 4, wan1.3b 1)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--measure-steps", type=int, default=None, help="K < steps: measure K and scale (wan1.3b: 2)")
    p.add_argument("--loader-items", type=int, default=None, help="items in the loader's test artifact")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from tmdcli.artifacts.media import frames_to_uint8, read_mp4, uint8_to_frames, write_mp4
    from tmdcli.models import wan
    from tmdcli.sampler import generators_for, randn_per_sample, sample_teacher

    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    batch = args.batch_size or (4 if args.config == "tiny" else 1)
    k = args.measure_steps or (args.steps if args.config == "tiny" else min(2, args.steps))
    transformer, vae, text_fn, text_shape, (frames, height, width), fps = build(args.config, device, dtype)
    shape = wan.latent_shape(vae, transformer.config, frames, height, width)
    results = {"config": args.config, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
               "video": [frames, height, width], "latent": list(shape), "batch_size": batch,
               "sampler": {"steps": args.steps, "cfg": args.cfg,
                           "nfe_per_clip": args.steps * (2 if args.cfg != 1 else 1),
                           "measured_steps": k, "extrapolated": k < args.steps}}
    prompts = [f"a cat surfing a wave number {i}" for i in range(batch)]

    def embed(texts):
        if text_fn is not None:
            return text_fn(texts)[0]
        emb = torch.zeros(len(texts), *text_shape, device=device, dtype=dtype)
        emb[:, :20] = torch.randn(len(texts), 20, text_shape[1], device=device, dtype=dtype)
        return emb

    # --- synthesis: text, K sampler steps (scaled), VAE decode and mp4 per clip --------------------------------
    embed(prompts[:1])  # warm-up
    text, text_s = timed(lambda: embed(prompts), device)
    neg = embed(["bad quality"]).expand(batch, -1, -1)
    noise = randn_per_sample(shape, generators_for(range(batch)), device=device)

    def velocity(x, t):
        return wan.guided_velocity(transformer, x.to(dtype), t, text, neg, args.cfg)

    sample_teacher(velocity, noise, num_steps=1, flow_shift=5.0)  # warm-up
    latents, sample_s = timed(lambda: sample_teacher(velocity, noise, num_steps=k, flow_shift=5.0), device)
    transformer_s = sample_s * args.steps / k
    wan.vae_decode(vae, latents[:1, :, :1])  # warm-up
    video, decode_s = timed(lambda: wan.vae_decode(vae, latents[:1]), device)
    if device.type == "cuda":
        results["vae_decode_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    scratch = Path(tempfile.mkdtemp(prefix="tmd-bench-"))
    clip = frames_to_uint8(video[0], layout="CFHW")
    t0 = time.perf_counter()
    try:
        write_mp4(clip, scratch / "clip.mp4", fps=fps)
        mp4_write_s = time.perf_counter() - t0
    except Exception as exc:  # e.g. no imageio-ffmpeg on a GPU image: the GPU numbers stand without the CPU part
        print(f"mp4 not measured: {exc}", file=sys.stderr)
        mp4_write_s = None
    per_clip = text_s / batch + transformer_s / batch + decode_s + (mp4_write_s or 0.0)
    results["synthesis"] = {"text_s_per_clip": None if text_fn is None else text_s / batch,
                            "transformer_s_per_clip": transformer_s / batch, "vae_decode_s_per_clip": decode_s,
                            "mp4_write_s_per_clip": mp4_write_s, "total_s_per_clip": per_clip,
                            "clips_per_hour": 3600 / per_clip}
    print(f"synthesis: {per_clip:.3f} s/clip ({3600 / per_clip:.0f} clips/h): "
          f"transformer {transformer_s / batch:.3f} s "
          f"({'scaled from ' + str(k) + ' steps' if k < args.steps else 'measured'}), VAE decode {decode_s:.3f} s, "
          f"mp4 {mp4_write_s if mp4_write_s is None else round(mp4_write_s, 3)} s", flush=True)
    del latents, noise
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    # --- encoding: mp4 read, VAE encode (fp32), text ----------------------------------------------------------
    t0 = time.perf_counter()
    frames_read = read_mp4(scratch / "clip.mp4") if mp4_write_s is not None else clip
    mp4_read_s = time.perf_counter() - t0 if mp4_write_s is not None else None
    pixels = torch.from_numpy(uint8_to_frames(frames_read))[None].to(device)
    wan.vae_encode(vae, pixels[:, :, :1])  # warm-up
    z, encode_s = timed(lambda: wan.vae_encode(vae, pixels), device)
    if device.type == "cuda":
        results["vae_encode_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    per_clip_enc = (mp4_read_s or 0.0) + encode_s + text_s / batch
    results["encoding"] = {"mp4_read_s_per_clip": mp4_read_s, "vae_encode_s_per_clip": encode_s,
                           "text_s_per_clip": None if text_fn is None else text_s / batch,
                           "total_s_per_clip": per_clip_enc, "clips_per_hour": 3600 / per_clip_enc,
                           # with latents saved by synth-videos (same VAE) only the text encoder runs
                           "with_reused_latents_s_per_clip": None if text_fn is None else text_s / batch}
    print(f"encoding: {per_clip_enc:.3f} s/clip ({3600 / per_clip_enc:.0f} clips/h): mp4 read "
          f"{mp4_read_s if mp4_read_s is None else round(mp4_read_s, 3)} s, "
          f"VAE encode {encode_s:.3f} s", flush=True)

    # --- loader: read speed over a latents artifact of this shape ----------------------------------------------
    results["loader"] = bench_loader(z[0].cpu(), text_shape, scratch, args.loader_items or (64 if args.config == "tiny"
                                                                                           else 16))
    print(f"loader: {results['loader']['items_per_s']:.1f} items/s ({results['loader']['storage_dtype']})", flush=True)

    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return results


def bench_loader(latent, text_shape, scratch: Path, num_items: int) -> dict:
    from tmdcli.artifacts.store import Store
    from tmdcli.data.loaders import LatentLoader
    from tmdcli.data.shards import (NEGATIVE_FILE, latents_shard_name, storage_dtype_name, write_latents_shard,
                                    write_negative)

    dtype_name = storage_dtype_name("auto", latent.numel())
    dtype = getattr(torch, dtype_name)
    staging = Store(scratch / "home").begin(kind="latents", stage="encode-latents", stage_version=1, config={},
                                            identity_config={})
    per_shard = 8
    for k in range((num_items + per_shard - 1) // per_shard):
        n = min(per_shard, num_items - k * per_shard)
        text = torch.zeros(n, *text_shape)
        text[:, :50] = torch.randn(n, min(50, text_shape[0]), text_shape[1])
        meta = {"shard": k, "latent_shape": list(latent.shape), "max_sequence_length": text_shape[0],
                "text_dim": text_shape[1], "prompts": ["p"] * n, "seeds": [0] * n, "failed": []}
        with staging.atomic_path(latents_shard_name(k)) as tmp:
            write_latents_shard(tmp, ids=list(range(k * per_shard, k * per_shard + n)),
                                latents_BCTHW=latent.expand(n, *latent.shape), text_BSD=text,
                                text_lengths_B=torch.full((n,), min(50, text_shape[0])), meta=meta, dtype=dtype)
    with staging.atomic_path(NEGATIVE_FILE) as tmp:
        write_negative(tmp, text_1SD=torch.zeros(1, *text_shape), length=10, prompt="", dtype=dtype)
    artifact = staging.commit()
    loader = LatentLoader(artifact, batch_size=4, rank=0, world_size=1)
    t0 = time.perf_counter()
    seen = sum(len(b["ids"]) for b in loader)
    elapsed = time.perf_counter() - t0
    return {"items": seen, "seconds": elapsed, "items_per_s": seen / elapsed, "storage_dtype": dtype_name,
            "bytes_per_item": sum(f["bytes"] for f in artifact.manifest.files) / num_items}


if __name__ == "__main__":
    main()
