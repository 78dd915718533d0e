"""A local CLIP for the CLIP score (EVAL.md 3): an open_clip checkpoint file or a transformers CLIP folder.

Only local files are read (`local_files_only`, an explicit checkpoint path); when neither form is given the quick
suite simply has no CLIP metrics. `check_clip` is the cheap part the plan runs; `load_clip` imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tmdcli.errors import UsageError
from tmdcli.optional import check, require

# OpenAI CLIP preprocessing constants (the same in open_clip and transformers).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_clip(path: str | Path, arch: str) -> dict:
    """Say which form `path` is and check it can be loaded, without loading it; exit 2 otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--clip-model {path} is a folder without config.json",
                             hint="give a transformers CLIP folder (config.json, weights, tokenizer) or an "
                                  "open_clip checkpoint file")
        return {"kind": "transformers", "path": str(path.resolve()), "arch": None}
    if not path.is_file():
        raise UsageError(f"--clip-model {path} does not exist", hint="give a local CLIP folder or checkpoint file")
    check("open_clip", extra="clip", purpose=f"--clip-model {path} (a checkpoint file)",
          alternative="pass a transformers CLIP folder instead")
    return {"kind": "open_clip", "path": str(path.resolve()), "arch": arch, "bytes": path.stat().st_size}


@dataclass
class ClipEncoder:
    """L2-normalised CLIP image features per frame and text features per prompt, as numpy arrays."""

    encode_frames: Callable[[np.ndarray], np.ndarray]  # uint8 [F, H, W, 3] -> [F, D]
    encode_texts: Callable[[list[str]], np.ndarray]  # N prompts -> [N, D]
    identity: dict


def load_clip(path: str | Path, arch: str = "ViT-B-32", device: str = "cpu") -> ClipEncoder:
    info = check_clip(path, arch)
    if info["kind"] == "transformers":
        return _load_transformers(Path(info["path"]), device, info)
    return _load_open_clip(Path(info["path"]), arch, device, info)


def _resize_crop(frames: np.ndarray, size: int, device: str):
    """uint8 [F, H, W, 3] -> normalised float [F, 3, size, size]: shorter side to `size` (bicubic), centre crop."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                      align_corners=False, antialias=True).clamp(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def _unit(t) -> np.ndarray:
    t = t.float()
    return (t / t.norm(dim=-1, keepdim=True).clamp_min(1e-8)).cpu().numpy().astype(np.float64)


def _load_transformers(folder: Path, device: str, info: dict) -> ClipEncoder:
    import torch
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    size = model.config.vision_config.image_size
    max_len = model.config.text_config.max_position_embeddings  # 77 for CLIP: longer prompts are truncated

    def pooled(out):  # transformers 5 returns a model output, 4.x a tensor
        return out if torch.is_tensor(out) else out.pooler_output

    @torch.no_grad()
    def encode_frames(frames: np.ndarray) -> np.ndarray:
        return _unit(pooled(model.get_image_features(pixel_values=_resize_crop(frames, size, device))))

    @torch.no_grad()
    def encode_texts(texts: list[str]) -> np.ndarray:
        tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return _unit(pooled(model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                    attention_mask=tokens["attention_mask"].to(device))))

    return ClipEncoder(encode_frames, encode_texts, {**info, "image_size": size})


def _load_open_clip(file: Path, arch: str, device: str, info: dict) -> ClipEncoder:
    import torch

    open_clip = require("open_clip", extra="clip", purpose="an open_clip --clip-model")

    try:
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=str(file), device=device)
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/KeyError for a wrong arch or file
        raise UsageError(f"open_clip cannot load {file} as {arch}: {exc}",
                         hint="pass the matching --clip-arch (e.g. ViT-B-32, ViT-L-14)") from exc
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size

    @torch.no_grad()
    def encode_frames(frames: np.ndarray) -> np.ndarray:
        return _unit(model.encode_image(_resize_crop(frames, size, device)))

    @torch.no_grad()
    def encode_texts(texts: list[str]) -> np.ndarray:
        return _unit(model.encode_text(tokenizer(list(texts)).to(device)))

    return ClipEncoder(encode_frames, encode_texts, {**info, "image_size": size})
