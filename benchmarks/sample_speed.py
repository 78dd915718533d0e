"""Sampling speed end to end (issue 18): text encoder, transformer, VAE decode and mp4 writing, for the teacher's
50-step CFG sampler and TMD students of several (M, N, H), under each speed option, side by side in one run.

    python benchmarks/sample_speed.py --quick --out /tmp/q.json                                  # CPU, seconds
    python benchmarks/sample_speed.py --config tiny --out sample_speed_cpu.json                  # 2-core CPU
    python benchmarks/sample_speed.py --config wan1.3b --device cuda --teacher-measure-steps 3 \
        --compile --out sample_speed_gpu.json                                                    # full 1.3B shapes

Weights are random (speed does not depend on the values). What it reports:
- `matmul_tflops`: the chip's measured dense matmul rate in the compute dtype (the MFU denominator);
- `text_encoder_s`: one prompt through the text encoder (at full size a random umT5-XXL on 512 random token ids, as
  the Wan pipeline pads to 512; the tiny config runs the tiny tokenizer and encoder);
- `decode`: every decoder variant (stock per-frame / chunked, fp32 / bf16, compiled, the tiny TAEHV-style decoder)
  with its time and PSNR against the stock fp32 decode (random TAEHV weights unless --taehv: speed only);
- `stacks`: per transformer stack (attention backend, per-block compile, CUDA graphs) the transformer seconds of the
  teacher and each student, MFU from tmdcli/runtime/estimates.py FLOPs, and end-to-end seconds with the fastest
  exact decode (PSNR >= --min-psnr against fp32) and with the tiny decoder, plus speed-ups against the teacher
  measured in the same stack;
- `mp4_write_s`: writing the decoded clip (reported apart, not part of end to end).
With `--teacher-measure-steps K < --teacher-steps` the teacher is measured over K steps and scaled (every step
costs the same); a stack that fails (e.g. a compile error) is recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from _common import WAN13B_CONFIG, sync, timed  # noqa: E402,F401 (benchmarks/ is on sys.path when run as a script)

UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
                feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


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


def matmul_tflops(device, dtype, size: int, repeats: int = 10) -> float:
    """Measured dense matmul rate (TFLOP/s) of size x size products: the denominator of MFU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _, seconds = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * size**3 * repeats / seconds / 1e12


def text_encoder_seconds(config: str, device, dtype, repeats: int) -> float:
    """One prompt through the text encoder, as the sampler runs it (best of `repeats`)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from tmdcli.models import wan
    from tmdcli.models.tiny import build_tiny_components

    if config == "tiny":
        comps = build_tiny_components()
        tok, enc = comps["tokenizer"], comps["text_encoder"].to(device)
        run = lambda: wan.encode_text(tok, enc, ["a cat surfing a wave"], 32, device, dtype)  # noqa: E731
    else:
        with torch.device(device):
            enc = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).eval().to(dtype)
        ids = torch.randint(2, UMT5_XXL["vocab_size"], (1, 512), device=device)
        mask = torch.zeros(1, 512, dtype=torch.long, device=device)
        mask[:, :40] = 1
        run = lambda: enc(ids, mask)  # noqa: E731
    with torch.no_grad():
        run()
        seconds = min(timed(run, device)[1] for _ in range(repeats))
    del enc
    return seconds


def decoder_variants(vae, latent, device, args) -> dict:
    """Time and PSNR (against the stock fp32 decode) of each decoder variant on the same normalised latent."""
    from tmdcli.models.vae_decode import psnr
    from tmdcli.runtime.speed import SpeedOptions, make_decoder

    variants = {"stock_fp32": SpeedOptions(decoder="wan-stock")}
    if not args.quick:
        variants["stock_bf16"] = SpeedOptions(decoder="wan-stock", vae_dtype="bfloat16")
    for k in args.vae_chunks:
        variants[f"chunked{k}_fp32"] = SpeedOptions(vae_chunk=k)
        variants[f"chunked{k}_bf16"] = SpeedOptions(vae_chunk=k, vae_dtype="bfloat16")
        if args.compile:
            variants[f"chunked{k}_bf16_compiled"] = SpeedOptions(vae_chunk=k, vae_dtype="bfloat16", compile=True)
    variants["taehv_bf16"] = SpeedOptions(decoder=f"taehv:{args.taehv or random_taehv_file()}", vae_dtype="bfloat16")
    results, reference = {}, None
    for name, opts in variants.items():
        try:
            decode = make_decoder(vae, opts, device)
            decode(latent)  # warm-up (and compilation)
            video, seconds = min((timed(lambda: decode(latent), device) for _ in range(args.repeats)),
                                 key=lambda r: r[1])
        except Exception as exc:  # a failed variant is a result, not the end of the run
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        if reference is None:
            reference = video
        row = {"decode_s": seconds, "frames": list(video.shape[2:])}
        if name.startswith("taehv") and args.taehv is None:
            row["psnr_vs_fp32"] = None  # random weights: speed only
        elif video.shape == reference.shape:
            value = psnr(video, reference)
            row["psnr_vs_fp32"] = value if value != float("inf") else None  # None: identical (strict JSON)
            row["max_abs_diff_vs_fp32"] = float((video - reference).abs().max())
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        results[name] = row
        print(f"decode {name}: {seconds:.3f} s, PSNR {row.get('psnr_vs_fp32')}", flush=True)
        del decode, video
    return results


def random_taehv_file() -> str:
    """A weights file of the tiny decoder with random values (speed only), in the taew2_1 layout."""
    from tmdcli.models.taehv import build_decoder

    path = Path(tempfile.mkdtemp(prefix="tmd-bench-")) / "taew2_1.pth"
    torch.save({f"decoder.{k}": v for k, v in build_decoder().state_dict().items()}, path)
    return str(path)


def transformer_stacks(device, args) -> list[dict]:
    """(name, attention, compile, cuda_graphs): diffusers' default first, then each installed backend, then compile."""
    from tmdcli.errors import UsageError
    from tmdcli.runtime.speed import check_attention_backend

    backends = []
    for name in args.attention:
        try:
            check_attention_backend(name)
            backends.append(name)
        except UsageError as exc:
            print(f"attention {name}: skipped ({exc.message})", flush=True)
    stacks = [{"name": "eager", "attention": None, "compile": False, "cuda_graphs": False}]
    stacks += [{"name": f"eager+{b}", "attention": b, "compile": False, "cuda_graphs": False} for b in backends]
    if args.compile:
        best = backends[-1] if backends else None  # the last listed is the one hoped fastest
        stacks.append({"name": "compile" + (f"+{best}" if best else ""), "attention": best, "compile": True,
                       "cuda_graphs": False})
        if device.type == "cuda":
            stacks.append({"name": "compile+cudagraphs" + (f"+{best}" if best else ""), "attention": best,
                           "compile": True, "cuda_graphs": True})
    return stacks


def apply_stack(transformer, stack: dict, args) -> None:
    """Undo the previous stack (compiled blocks, attention backend), then apply this one in place."""
    from tmdcli.runtime.speed import SpeedOptions, apply_to_transformer

    for block in transformer.blocks:
        block._compiled_call_impl = None
    torch._dynamo.reset()
    apply_to_transformer(transformer, SpeedOptions(attention=stack["attention"] or "native",
                                                   compile=stack["compile"], cuda_graphs=stack["cuda_graphs"],
                                                   compile_backend=args.compile_backend))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "wan1.3b"], default="tiny")
    p.add_argument("--quick", action="store_true", help="tiny config, 4 teacher steps, 2 students, 1 repeat (CI)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on cuda, fp32 on cpu")
    p.add_argument("--students", default="2,2,5;2,4,5;1,2,5;1,4,5;2,2,3",
                   help="M,N,H triples separated by ';' (H is capped at L-1 for tiny models)")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--teacher-measure-steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also measure per-block compile (and CUDA graphs on cuda)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--attention", default="flash,_flash_3,sage",
                   help="diffusers attention backends to try besides the default (skipped when not installed)")
    p.add_argument("--vae-chunks", default="1,4", help="latent frames per chunk of the chunked decoder")
    p.add_argument("--taehv", default=None, help="taew2_1 weights for the tiny decoder (default: random, speed only)")
    p.add_argument("--min-psnr", type=float, default=40.0, help="an exact-decoder variant must reach this PSNR")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.teacher_steps, args.repeats = "tiny", 2, 1
        args.students, args.attention, args.vae_chunks = "1,2,1", "", "4"
    args.attention = [a for a in args.attention.split(",") if a]
    args.vae_chunks = [int(k) for k in args.vae_chunks.split(",")]

    import diffusers
    import transformers

    from tmdcli.models import wan
    from tmdcli.models.student import StudentConfig, TMDStudent
    from tmdcli.runtime.estimates import WanShape, sampling_flops
    from tmdcli.sampler import generators_for, randn_per_sample, sample_teacher, sample_tmd

    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    transformer, vae, text_shape, (frames, height, width) = build(args.config, device, dtype)
    num_blocks = len(transformer.blocks)
    shape = wan.latent_shape(vae, transformer.config, frames, height, width)
    results = {"config": args.config, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "diffusers": diffusers.__version__, "transformers": transformers.__version__,
               "python": platform.python_version(), "video": [frames, height, width], "latent": list(shape),
               "num_blocks": num_blocks, "tokens": shape[1] * (shape[2] // 2) * (shape[3] // 2)}
    def save() -> None:  # after every section: a run cut by a timeout still leaves what it measured
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")

    results["matmul_tflops"] = matmul_tflops(device, dtype, 8192 if device.type == "cuda" else 256)
    print(f"matmul {dtype}: {results['matmul_tflops']:.4g} TFLOP/s", flush=True)
    results["text_encoder_s"] = text_encoder_seconds(args.config, device, dtype, args.repeats)
    print(f"text encoder: {results['text_encoder_s']:.3f} s", flush=True)

    text = torch.zeros(1, *text_shape, device=device, dtype=dtype)
    n_pos, n_neg = min(20, text_shape[0]), min(60, text_shape[0])  # real tokens, then zero padding (as Wan)
    text[:, :n_pos] = torch.randn(1, n_pos, text_shape[1], device=device, dtype=dtype)
    text_neg = torch.zeros_like(text)
    text_neg[:, :n_neg] = torch.randn(1, n_neg, text_shape[1], device=device, dtype=dtype)
    noise = randn_per_sample(shape, generators_for([0]), device=device)

    # Decoders first: identical for every model (same latent shape).
    latent = torch.randn(1, *shape, device=device)
    results["decode"] = decoder_variants(vae, latent, device, args)
    exact = {k: v for k, v in results["decode"].items() if not k.startswith("taehv") and "decode_s" in v
             and (v.get("max_abs_diff_vs_fp32") == 0.0 or (v.get("psnr_vs_fp32") or 0.0) >= args.min_psnr)}
    best_exact = min(exact, key=lambda k: exact[k]["decode_s"])
    results["best_exact_decoder"] = best_exact
    save()
    from tmdcli.artifacts.media import write_mp4_from_tensor

    video = wan.vae_decode(vae, latent)
    with tempfile.TemporaryDirectory() as scratch:
        _, results["mp4_write_s"] = timed(lambda: write_mp4_from_tensor(video[0], Path(scratch) / "a.mp4"),
                                          torch.device("cpu"))
    del video

    shape_info = WanShape.from_config(dict(transformer.config))
    text_tokens = text_shape[0]
    k = args.teacher_measure_steps or args.teacher_steps
    cfg_passes = 2 if args.cfg != 1 else 1
    students = []
    for triple in args.students.split(";"):
        m, n, h = (int(v) for v in triple.split(","))
        students.append(TMDStudent.from_teacher(transformer, StudentConfig(
            num_outer_steps=m, num_inner_steps=n, num_head_blocks=min(h, num_blocks - 1))).to(device))

    def velocity(x, t):
        return wan.guided_velocity(transformer, x.to(dtype), t, text, text_neg, args.cfg)

    def row(model, nfe, transformer_s, speedup_ref=None):
        flops = sampling_flops(shape_info, shape, block_passes=nfe * num_blocks, text_tokens=text_tokens)
        out = {"model": model, "effective_nfe": nfe, "transformer_s": transformer_s,
               "mfu": flops / transformer_s / (results["matmul_tflops"] * 1e12),
               "end_to_end_exact_s": results["text_encoder_s"] + transformer_s
               + results["decode"][best_exact]["decode_s"]}
        if "decode_s" in results["decode"].get("taehv_bf16", {}):
            out["end_to_end_taehv_s"] = results["text_encoder_s"] + transformer_s \
                + results["decode"]["taehv_bf16"]["decode_s"]
        if speedup_ref is not None:
            out["transformer_speedup"] = speedup_ref["transformer_s"] / transformer_s
            out["predicted_speedup"] = speedup_ref["effective_nfe"] / nfe
            out["end_to_end_speedup"] = speedup_ref["end_to_end_exact_s"] / out["end_to_end_exact_s"]
        return out

    results["stacks"] = []
    for stack in transformer_stacks(device, args):
        entry = dict(stack, models=[])
        try:
            apply_stack(transformer, stack, args)
            sample_teacher(velocity, noise, num_steps=2, flow_shift=5.0)  # warm-up (and compilation)
            teacher_s = min(timed(lambda: sample_teacher(velocity, noise, num_steps=k, flow_shift=5.0), device)[1]
                            for _ in range(1 if k > 10 else args.repeats)) * args.teacher_steps / k
            teacher = row(f"teacher {args.teacher_steps}x{cfg_passes}", args.teacher_steps * cfg_passes, teacher_s)
            teacher.update(measured_steps=k, extrapolated=k < args.teacher_steps)
            entry["models"].append(teacher)
            for student in students:
                c = student.config
                run = lambda: sample_tmd(student, noise, text, outer_grid=c.outer_grid(),  # noqa: E731
                                         inner_grid=c.inner_grid(), generators=generators_for([0]))
                run()  # warm-up
                seconds = min(timed(run, device)[1] for _ in range(args.repeats))
                entry["models"].append(row(f"TMD M{c.num_outer_steps} N{c.num_inner_steps} H{c.num_head_blocks}",
                                           student.effective_nfe, seconds, speedup_ref=teacher))
        except Exception as exc:  # record and go on: one failing stack must not cost the whole GPU run
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
        results["stacks"].append(entry)
        save()
        for r in entry["models"]:
            print(f"[{stack['name']}] {r['model']}: transformer {r['transformer_s']:.4f} s, MFU {r['mfu']:.1%}, "
                  f"end to end {r['end_to_end_exact_s']:.3f} s"
                  + (f" ({r['end_to_end_speedup']:.1f}x)" if "end_to_end_speedup" in r else ""), flush=True)
        if "error" in entry:
            print(f"[{stack['name']}] failed: {entry['error']}", flush=True)
    if device.type == "cuda":
        results["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    save()
    print(json.dumps(results, indent=2) if not args.quick else f"wrote {args.out}")


if __name__ == "__main__":
    main()
