"""The `toy` teacher bundle: configs, tokenizer, random components, and save/load in diffusers Wan layout.

The bundle is a real Wan2.1 checkpoint in miniature (WAN.md sections 1 and 6): a tiny `WanTransformer3DModel`, a tiny
`AutoencoderKLWan`, a tiny frozen `UMT5EncoderModel`, a word-level `T5Tokenizer` built for the toy grammar, and a
`UniPCMultistepScheduler`. `tmdcli.toy.train` trains it; the trained bundle ships in `BUNDLED_DIR`.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

BUNDLED_DIR = Path(__file__).parent / "weights"

# Default clip size of the toy world: 17 frames at 32 x 32 -> latent 8 x 5 x 8 x 8 -> 80 video tokens.
TOY_NUM_FRAMES = 17
TOY_HEIGHT = 32
TOY_WIDTH = 32
TOY_FPS = 8

TOY_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=16,
    z_dim=8,
    dim_mult=[1, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[True, True],
    dropout=0.0,
    scale_factor_spatial=4,
    scale_factor_temporal=4,
    # Placeholders: training replaces them with the per-channel mean/std of the encoded training set.
    latents_mean=[0.0] * 8,
    latents_std=[1.0] * 8,
)

TOY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=8,
    out_channels=8,
    text_dim=64,
    freq_dim=256,
    ffn_dim=256,
    num_layers=12,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=32,
)

TOY_MAX_SEQUENCE_LENGTH = 32
TOY_NEGATIVE_PROMPT = ""

# Sampling defaults written to tmd_teacher.json (train.py may overwrite them with calibrated values).
TOY_FLOW_SHIFT = 2.0
TOY_GUIDANCE_SCALE = 4.0
TOY_NUM_STEPS = 50

_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 = pad, eos, unk of the UMT5 config below
_PUNCTUATION = ".,;:!?'\"-()"


TOY_TEXT_ENCODER_CONFIG: dict[str, Any] = dict(  # UMT5Config kwargs; vocab_size comes from the tokenizer
    d_model=TOY_TRANSFORMER_CONFIG["text_dim"],
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


def tokenizer_vocab(words: list[str]) -> list[tuple[str, float]]:
    """Unigram vocabulary: specials, the word pieces with a high score, then single characters with a low score.

    A whole word ("\u2581red") always beats its spelling by characters, so every grammar caption tokenizes to
    whole words; anything else still tokenizes (by characters) instead of becoming <unk>.
    """
    pieces: list[tuple[str, float]] = [(t, 0.0) for t in _SPECIAL_TOKENS] + [("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    forms = []
    for w in words:
        forms += [w, w.lower(), w.capitalize()]
    for w in forms:
        piece = "\u2581" + w
        if w and piece not in seen:
            pieces.append((piece, -1.0))
            seen.add(piece)
    for c in _PUNCTUATION:  # punctuation after a space ("\u2581,") and glued to a word (",")
        for piece in ("\u2581" + c, c):
            if piece not in seen:
                pieces.append((piece, -3.0))
                seen.add(piece)
    for c in string.ascii_letters + string.digits:
        if c not in seen:
            pieces.append((c, -10.0))
            seen.add(c)
    return pieces


def build_tokenizer():
    """Word-level `T5Tokenizer` over `grammar.vocabulary()` (in memory, no sentencepiece; WAN.md 6.2)."""
    from transformers import T5Tokenizer

    from tmdcli.toy import grammar

    return T5Tokenizer(vocab=tokenizer_vocab(list(grammar.vocabulary())), extra_ids=0)


def make_scheduler(flow_shift: float = TOY_FLOW_SHIFT):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)


def cast_rope_fp32(transformer) -> None:
    """diffusers builds the Wan rotary tables in float64 on CPU (WAN.md pitfall 11); keep them float32."""
    rope = transformer.rope
    for name in ("freqs_cos", "freqs_sin"):
        buf = getattr(rope, name, None)
        if buf is not None and buf.dtype != torch.float32:
            setattr(rope, name, buf.to(torch.float32))


def to_device_dtype(transformer, device, dtype: torch.dtype = torch.float32):
    """Move a Wan transformer to device/dtype while its rotary tables stay float32 (never fp64, never bf16)."""
    transformer.to(device)
    cast_rope_fp32(transformer)
    if dtype != torch.float32:
        rope = {n: b for n, b in transformer.rope.named_buffers(recurse=False)}
        transformer.to(dtype)
        for n, b in rope.items():
            setattr(transformer.rope, n, b)
    return transformer


def build_components(seed: int = 0) -> dict[str, Any]:
    """Random-initialised toy components (seeded): transformer, vae, text_encoder (frozen, eval), tokenizer, scheduler."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TOY_TEXT_ENCODER_CONFIG)).eval()
        text_encoder.requires_grad_(False)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**TOY_VAE_CONFIG).eval()
        torch.manual_seed(seed + 2)
        transformer = WanTransformer3DModel(**TOY_TRANSFORMER_CONFIG).eval()
    finally:
        torch.random.set_rng_state(gen_state)
    cast_rope_fp32(transformer)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=make_scheduler())


def teacher_defaults(**overrides: Any) -> dict[str, Any]:
    """The `tmd_teacher.json` content: how the registry samples this teacher by default."""
    d = dict(family="wan2.1", name="toy", num_frames=TOY_NUM_FRAMES, height=TOY_HEIGHT, width=TOY_WIDTH,
             num_steps=TOY_NUM_STEPS, guidance_scale=TOY_GUIDANCE_SCALE, flow_shift=TOY_FLOW_SHIFT, sampler="unipc",
             max_sequence_length=TOY_MAX_SEQUENCE_LENGTH, negative_prompt=TOY_NEGATIVE_PROMPT, fps=TOY_FPS)
    d.update(overrides)
    return d


def save_bundle(components: dict[str, Any], out_dir: str | Path, *, teacher_defaults: dict[str, Any],
                metrics: dict[str, Any] | None = None) -> Path:
    """Write the components as a diffusers Wan checkpoint folder (atomic: staged in a sibling tmp dir, then renamed).

    Layout: model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/ (safetensors), plus
    tmd_teacher.json (sampling defaults) and metrics.json (when given). An existing out_dir is replaced.
    """
    from diffusers import WanPipeline

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        scheduler = components["scheduler"]
        if "flow_shift" in teacher_defaults and scheduler.config.get("flow_shift") != teacher_defaults["flow_shift"]:
            scheduler = make_scheduler(float(teacher_defaults["flow_shift"]))
        pipe = WanPipeline(tokenizer=components["tokenizer"], text_encoder=components["text_encoder"],
                           vae=components["vae"], scheduler=scheduler, transformer=components["transformer"])
        pipe.save_pretrained(stage, safe_serialization=True)
        (stage / "tmd_teacher.json").write_text(json.dumps(teacher_defaults, indent=2) + "\n")
        if metrics is not None:
            (stage / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(stage, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out_dir


def load_bundle(bundle_dir: str | Path = BUNDLED_DIR, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Load a toy (or any Wan-layout) folder: the five components plus `teacher` (tmd_teacher.json) and `metrics`.

    The transformer gets `dtype`; the VAE and the text encoder stay float32 (WAN.md pitfall 8).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import T5Tokenizer, UMT5EncoderModel

    d = Path(bundle_dir)
    if not (d / "model_index.json").is_file():
        raise FileNotFoundError(f"{d} is not a diffusers Wan folder (no model_index.json); "
                                "retrain it with `python -m tmdcli.toy.train --out DIR`")
    transformer = WanTransformer3DModel.from_pretrained(d / "transformer", local_files_only=True)
    transformer = to_device_dtype(transformer, device, dtype).eval()
    vae = AutoencoderKLWan.from_pretrained(d / "vae", local_files_only=True).to(device).eval()
    text_encoder = UMT5EncoderModel.from_pretrained(d / "text_encoder", local_files_only=True).to(device).eval()
    text_encoder.requires_grad_(False)
    tokenizer = T5Tokenizer.from_pretrained(d / "tokenizer", local_files_only=True)
    scheduler = UniPCMultistepScheduler.from_pretrained(d / "scheduler", local_files_only=True)
    teacher = json.loads((d / "tmd_teacher.json").read_text()) if (d / "tmd_teacher.json").is_file() else {}
    metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else None
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler, teacher=teacher, metrics=metrics)
