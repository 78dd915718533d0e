"""Sampling speed options shared by `tmd sample`, `synth-videos`, `tmd eval` and the Python API (issue 18).

Each option is on by default only where the output stays the same within a stated tolerance:

- decoder `auto` = `wan`: the chunked Wan2.1 decode of models/vae_decode.py, equal to diffusers' per-frame decode
  within 1e-5 (fp32, tests/test_speed.py); `wan-stock` is diffusers' own; `taehv:PATH` is the approximate tiny
  decoder of models/taehv.py (never a default).
- vae_dtype `auto` = float32 (bfloat16 changes pixels: about 0.007 mean absolute error measured on an H200).
- compile (off by default: costs compile time, pays only over many clips): torch.compile of each DiT block (diffusers'
  regional compilation) and of the decoder chunk function.
- attention (default: diffusers' own, torch SDPA): a backend of diffusers' attention dispatcher; flash-attention 3
  and sage attention only when their package is installed (sage quantises: not exact).
- cuda_graphs (CUDA only): the compiled blocks in torch.compile's "reduce-overhead" mode, which captures them in CUDA
  graphs (the few-step loop has fixed shapes, so the graphs are replayed without relaunching kernels).

`check()` is torch-free (plans and dry runs); `check_runtime()` imports diffusers and is called before any weights
are loaded; `apply_to_transformer()` and `make_decoder()` do the work.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tmdcli.errors import UsageError

VAE_DTYPES = ("auto", "float32", "bfloat16")
DECODERS = ("auto", "wan", "wan-stock")  # or taehv:PATH
ATTENTION_ALIASES = {"sdpa": "native", "fa2": "flash", "fa3": "_flash_3", "flash3": "_flash_3",
                     "cudnn": "_native_cudnn"}
# What to install for a dispatcher backend whose package is missing (diffusers' own message names no package for FA3).
ATTENTION_PACKAGES = {"flash": "flash-attn", "flash_varlen": "flash-attn",
                      "_flash_3": "flash_attn_3 (FlashAttention 3: build the hopper/ folder of Dao-AILab/"
                                  "flash-attention; it provides the flash_attn_interface module)",
                      "_flash_varlen_3": "flash_attn_3 (see _flash_3)", "sage": "sageattention",
                      "sage_varlen": "sageattention", "xformers": "xformers"}


@dataclass(frozen=True)
class SpeedOptions:
    """How to run the transformer and the VAE decode; none of these changes which model is sampled."""

    vae_dtype: str = "auto"  # auto (= float32), float32, bfloat16
    decoder: str = "auto"  # auto (= wan), wan, wan-stock, taehv:PATH
    vae_chunk: int = 4  # latent frames per chunk of the wan decoder after frame 0 (memory vs launches)
    compile: bool = False
    attention: str | None = None  # a diffusers AttentionBackendName value or alias; None: diffusers' default
    cuda_graphs: bool = False
    # $TMD_COMPILE_BACKEND (e.g. "eager" in tests: the plumbing without a compiler, or "aot_eager" to debug)
    compile_backend: str = field(default_factory=lambda: os.environ.get("TMD_COMPILE_BACKEND", "inductor"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def taehv_path(self) -> Path | None:
        return Path(self.decoder.split(":", 1)[1]).expanduser() if self.decoder.startswith("taehv:") else None

    @property
    def decoder_kind(self) -> str:
        return "taehv" if self.taehv_path is not None else ("wan" if self.decoder == "auto" else self.decoder)

    @property
    def attention_backend(self) -> str | None:
        if self.attention is None:
            return None
        name = self.attention.strip().lower()
        return ATTENTION_ALIASES.get(name, name)


def check(opts: SpeedOptions) -> SpeedOptions:
    """Validate the option values without importing torch (exit 2 with what to pass instead)."""
    if opts.vae_dtype not in VAE_DTYPES:
        raise UsageError(f"--vae-dtype {opts.vae_dtype!r} is not one of {', '.join(VAE_DTYPES)}")
    if opts.decoder not in DECODERS and not opts.decoder.startswith("taehv:"):
        raise UsageError(f"--decoder {opts.decoder!r} is not one of {', '.join(DECODERS)} or taehv:PATH",
                         hint="e.g. --decoder taehv:~/weights/taew2_1.pth (the tiny approximate decoder)")
    path = opts.taehv_path
    if path is not None and not path.is_file():
        raise UsageError(f"--decoder taehv: weights file {path} does not exist",
                         hint="download taew2_1.pth (github.com/madebyollin/taehv) and pass its path")
    if opts.vae_chunk < 1:
        raise UsageError(f"the decoder chunk must be >= 1 latent frame, got {opts.vae_chunk}")
    if opts.attention is not None and not opts.attention.strip():
        raise UsageError("--attention is empty", hint="e.g. --attention flash, fa3, sage, native")
    return opts


def check_runtime(opts: SpeedOptions, device) -> None:
    """Checks that need torch or diffusers, run before any weights are loaded: CUDA graphs need a GPU, the
    attention backend must exist and its package be installed."""
    import torch

    if opts.cuda_graphs and torch.device(device).type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device, got {device}",
                         hint="drop --cuda-graphs on CPU (use --compile alone)")
    if opts.attention_backend is not None:
        check_attention_backend(opts.attention_backend)


def check_attention_backend(name: str) -> None:
    """Raise UsageError unless diffusers' dispatcher knows `name` and can run it here without downloading."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    known = [b.value for b in AttentionBackendName]
    if name not in known:
        local = sorted(v for v in known if "hub" not in v)
        raise UsageError(f"--attention {name!r} is not a diffusers attention backend",
                         hint=f"choose one of {', '.join(local)} (aliases: {', '.join(ATTENTION_ALIASES)})")
    if "hub" in name:
        raise UsageError(f"--attention {name} downloads its kernel from the Hugging Face Hub, which tmd never does",
                         hint="install the package and use the local backend (flash, _flash_3 or sage)")
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as exc:
        package = ATTENTION_PACKAGES.get(name)
        hint = f"pip install {package}" if package else str(exc)
        raise UsageError(f"--attention {name}: its package is not installed or too old", hint=hint) from exc


def apply_to_transformer(transformer, opts: SpeedOptions) -> None:
    """Attention backend and per-block compile of a diffusers WanTransformer3DModel, in place.

    Per-block (regional) compilation keeps the student's backbone/head split intact: the student calls the blocks
    one by one (models/wan.py), and a compiled module is compiled wherever it is called from.
    """
    if opts.attention_backend is not None:
        _quiet_diffusers_warning(lambda: transformer.set_attention_backend(opts.attention_backend))
    if opts.compile or opts.cuda_graphs:
        transformer.compile_repeated_blocks(**compile_kwargs(opts))


def compile_kwargs(opts: SpeedOptions) -> dict:
    """torch.compile arguments: fixed shapes (one clip size per run); CUDA graphs via "reduce-overhead"."""
    kwargs = {"backend": opts.compile_backend, "dynamic": False}
    if opts.cuda_graphs:
        kwargs["mode"] = "reduce-overhead"
    return kwargs


def _quiet_diffusers_warning(fn: Callable) -> None:
    """diffusers logs an "experimental feature" warning on every backend switch; keep stderr for our messages."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        fn()
    finally:
        logging.set_verbosity(level)


def vae_torch_dtype(opts: SpeedOptions):
    import torch

    return torch.bfloat16 if opts.vae_dtype == "bfloat16" else torch.float32


def make_decoder(vae, opts: SpeedOptions, device) -> Callable:
    """A function from normalised latents (B, C, T, H, W) to float32 pixels in [-1, 1], as `opts` asks.

    The fp32 VAE itself is left untouched (encode-latents and synth-videos' digests use it): a bfloat16 decode
    gets its own copy of the decoder weights.
    """
    from tmdcli.models import wan

    dtype = vae_torch_dtype(opts)
    kind = opts.decoder_kind
    if kind == "taehv":
        from tmdcli.models.taehv import TaehvWeightsError, load_tiny_decoder

        try:
            tiny = load_tiny_decoder(opts.taehv_path, device=device, dtype=dtype)
        except TaehvWeightsError as exc:
            raise UsageError(f"--decoder taehv: {exc}", hint="pass the taew2_1.pth (Wan2.1) weights file") from exc
        run = _compiled(tiny, opts) if opts.compile else tiny
        return lambda latents: wan.vae_decode(vae, latents, decode=run, dtype=dtype)
    source = vae if dtype == next(vae.parameters()).dtype else _decoder_copy(vae, dtype)
    if kind == "wan-stock":
        return lambda latents: wan.vae_decode(source, latents, decode=lambda z: source.decode(z).sample, dtype=dtype)
    from tmdcli.models.vae_decode import check_supported, chunked_decode, decode_chunk

    try:
        check_supported(vae)
    except ValueError as exc:
        raise UsageError(f"--decoder wan: {exc}", hint="use --decoder wan-stock for this VAE") from exc
    chunk_fn = _compiled(decode_chunk, opts) if opts.compile else None
    return lambda latents: wan.vae_decode(
        source, latents, decode=lambda z: chunked_decode(source, z, chunk_frames=opts.vae_chunk, chunk_fn=chunk_fn),
        dtype=dtype)


def _decoder_copy(vae, dtype):
    """The VAE's decoder side (config, post_quant_conv, decoder) as a copy in `dtype`; the encoder is not copied."""
    import copy

    encoder, vae.encoder = vae.encoder, None
    try:
        twin = copy.deepcopy(vae)
    finally:
        vae.encoder = encoder
    _quiet_diffusers_warning(lambda: twin.to(dtype))  # diffusers warns on any cast of a loaded model
    return twin


def _compiled(fn, opts: SpeedOptions):
    import torch

    return torch.compile(fn, backend=opts.compile_backend, dynamic=False)


# --- stages that write artifacts (synth-videos, eval) ----------------------------------------------------------
CONFIG_FIELDS = ("vae_dtype", "decoder", "compile", "attention", "cuda_graphs")  # the CLI's speed options


def from_config(cfg) -> SpeedOptions:
    """The speed options a stage config carries as flat fields (CONFIG_FIELDS)."""
    return SpeedOptions(**{name: getattr(cfg, name) for name in CONFIG_FIELDS})


def check_exact(opts: SpeedOptions, stage: str) -> SpeedOptions:
    """Refuse the options that change pixels beyond the stated tolerances in a stage whose artifact others consume.

    Their config fields are recorded in the manifest but not fingerprinted (a run with --compile resumes a run
    without), which is only right while every accepted option keeps the output.
    """
    check(opts)
    if opts.vae_dtype == "bfloat16" or opts.decoder_kind == "taehv":
        raise UsageError(f"{stage} decodes with the exact Wan decoder in float32 (its videos are data or metrics)",
                         hint="drop --vae-dtype bfloat16 / --decoder taehv here; they are for `tmd sample`")
    if (opts.attention_backend or "").startswith("_sage") or (opts.attention_backend or "").startswith("sage"):
        raise UsageError(f"{stage}: sage attention quantises attention (not exact)",
                         hint="use native, cudnn, flash or fa3 here")
    return opts
