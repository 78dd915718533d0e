"""Teacher registry: names -> where the weights come from, default video size and sampler settings.

`wan2.1-1.3b` / `wan2.1-14b`: diffusers checkpoints from the local Hugging Face cache (local_files_only) or a folder;
`toy`: the bundled toy-world teacher; `tiny-random`: hermetic random components built in code; any local folder in
diffusers Wan layout. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from tmdcli.errors import TeacherNotFoundError, UsageError
from tmdcli.models.defaults import SamplingDefaults

WAN_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
TEACHER_DEFAULTS_FILE = "tmd_teacher.json"
TOY_BUNDLE_DIR = Path(__file__).parent / "toy" / "weights"


@dataclass(frozen=True, kw_only=True)
class TeacherEntry:
    """A registered teacher: how to get its components and what it produces by default."""

    name: str
    kind: str  # "hub-cache" | "folder" | "builtin"
    family: str = "wan2.1"
    repo_id: str | None = None
    folder: str | None = None
    description: str = ""
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    # Training defaults (lr, loss constant c, discriminator blocks) are not here: they follow the transformer's
    # config, whatever the name (models/family.py), so a 14B checkpoint given as a folder gets the 14B values.


REGISTRY: dict[str, TeacherEntry] = {
    "wan2.1-1.3b": TeacherEntry(name="wan2.1-1.3b", kind="hub-cache", repo_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                                description="Wan2.1 T2V 1.3B (30 blocks, D=1536)"),
    "wan2.1-14b": TeacherEntry(name="wan2.1-14b", kind="hub-cache", repo_id="Wan-AI/Wan2.1-T2V-14B-Diffusers",
                               description="Wan2.1 T2V 14B (40 blocks, D=5120)"),
    "toy": TeacherEntry(name="toy", kind="folder", folder=str(TOY_BUNDLE_DIR),
                        description="toy world teacher bundled with tmdcli (17x32x32 clips)",
                        defaults=SamplingDefaults(num_frames=17, height=32, width=32, fps=8, max_sequence_length=32,
                                                  negative_prompt="")),
    "tiny-random": TeacherEntry(name="tiny-random", kind="builtin",
                                description="hermetic random 4-block Wan for tests (9x32x32 clips, seconds on a CPU)",
                                defaults=SamplingDefaults(num_frames=9, height=32, width=32, max_sequence_length=32,
                                                          fps=8)),
}


def hf_cache_dir() -> Path:
    """Where huggingface_hub looks for cached repositories (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def resolve_teacher(name_or_path: str) -> TeacherEntry:
    """A registry name, or a folder in diffusers Wan layout. Unknown names exit 2 with the list of known ones."""
    override = os.environ.get("TMD_TEACHER_OVERRIDE")
    if override:
        name_or_path = override
    if not name_or_path or not name_or_path.strip():
        raise UsageError("no teacher given", hint=f"use --teacher with one of: {', '.join(REGISTRY)} or a folder")
    if name_or_path in REGISTRY:
        return REGISTRY[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return TeacherEntry(name=str(path.resolve()), kind="folder", folder=str(path.resolve()),
                            description="local folder in diffusers Wan layout")
    raise UsageError(f"unknown teacher {name_or_path!r}",
                     hint=f"known teachers: {', '.join(REGISTRY)}; or pass a folder in diffusers Wan layout")


def locate_folder(entry: TeacherEntry) -> Path:
    """The folder holding the entry's components; raises TeacherNotFoundError saying where we looked."""
    if entry.kind == "builtin":
        raise ValueError(f"{entry.name} is built in code and has no folder")
    if entry.kind == "folder":
        folder = Path(entry.folder)
        if entry.name == "toy" and not (folder / "model_index.json").is_file():
            raise TeacherNotFoundError(f"the toy teacher bundle is missing at {folder}",
                                       hint="retrain it with `python -m tmdcli.toy.train --out DIR` "
                                            "(see docs/toy-training.md), then copy DIR/bundle there")
        check_wan_layout(folder)
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(entry.repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        raise TeacherNotFoundError(
            f"weights of {entry.name} ({entry.repo_id}) are not in the local Hugging Face cache {hf_cache_dir()}",
            hint=f"download them once with `hf download {entry.repo_id}` (or `huggingface-cli download`), "
                 f"or pass --teacher /path/to/folder in diffusers Wan layout; tmd never downloads weights itself",
        ) from exc
    check_wan_layout(folder)
    return folder


def check_wan_layout(folder: Path) -> None:
    """Every component folder must hold its config (and weights) before anything heavy is loaded."""
    missing = [f"{part}/" for part in WAN_PARTS if not (folder / part).is_dir()]
    for part in ("transformer", "vae", "text_encoder"):
        sub = folder / part
        if sub.is_dir():
            if not (sub / "config.json").is_file():
                missing.append(f"{part}/config.json")
            if not any(sub.glob("*.safetensors")) and not any(sub.glob("*.safetensors.index.json")):
                missing.append(f"{part}/*.safetensors")
    if missing:
        raise TeacherNotFoundError(f"{folder} is not a complete diffusers Wan checkpoint: missing {', '.join(missing)}",
                                   hint="point --teacher at a folder with transformer/, vae/, text_encoder/ and "
                                        "tokenizer/ (as in Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")


def teacher_defaults(entry: TeacherEntry) -> SamplingDefaults:
    """The entry's defaults, overridden by a `tmd_teacher.json` in its folder (the toy bundle ships one)."""
    if entry.kind != "folder":
        return entry.defaults
    path = Path(entry.folder) / TEACHER_DEFAULTS_FILE
    if not path.is_file():
        return entry.defaults
    stored = json.loads(path.read_text())
    known = set(SamplingDefaults.__dataclass_fields__)
    return replace(entry.defaults, **{k: v for k, v in stored.items() if k in known})


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for, but no CUDA GPU is visible", hint="use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise UsageError(f"unknown dtype {dtype!r}", hint="use auto, float32, bfloat16 or float16")
    return table[dtype]


def load_teacher(name_or_path: str, *, device: str = "auto", dtype: str = "auto",
                 parts: tuple[str, ...] = ("transformer", "vae", "text_encoder")):
    """Load a teacher's components (only `parts`; the tokenizer comes with the text encoder) onto one device.

    The transformer and text encoder run in `dtype`; the VAE always runs in float32 (WAN.md 4 and 9.8).
    """
    import torch

    from tmdcli.models.teacher import Teacher
    from tmdcli.models.wan import float32_rope

    entry = resolve_teacher(name_or_path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    defaults = teacher_defaults(entry)
    if entry.kind == "builtin":
        from tmdcli.models.tiny import build_tiny_components

        comps = build_tiny_components(seed=0)
        transformer = _to(comps["transformer"], dev, dt) if "transformer" in parts else None
        teacher = Teacher(name=entry.name, source="built in code (seed 0)", defaults=defaults,
                          transformer=transformer, vae=comps["vae"].to(dev) if "vae" in parts else None,
                          text_encoder=_to(comps["text_encoder"], dev, dt), tokenizer=comps["tokenizer"],
                          device=dev, dtype=dt)
        teacher._transformer_config = comps["transformer"].config
        if transformer is not None:
            float32_rope(transformer)
        return teacher

    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = locate_folder(entry)
    _quiet_loading()
    transformer = None
    if "transformer" in parts:
        transformer = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", dtype=dt,
                                                            local_files_only=True).to(dev).eval()
        transformer.requires_grad_(False)
        float32_rope(transformer)
    vae = None
    if "vae" in parts:
        vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", dtype=torch.float32,
                                               local_files_only=True).to(dev).eval()
        vae.requires_grad_(False)
    text_encoder = UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder", dtype=dt,
                                                    local_files_only=True).to(dev).eval()
    text_encoder.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    teacher = Teacher(name=entry.name, source=str(folder), defaults=defaults, transformer=transformer, vae=vae,
                      text_encoder=text_encoder, tokenizer=tokenizer, device=dev, dtype=dt)
    if transformer is None:
        teacher._transformer_config = WanTransformer3DModel.load_config(folder, subfolder="transformer",
                                                                         local_files_only=True)
        teacher._transformer_config = _AttrDict(teacher._transformer_config)
    return teacher


def _quiet_loading() -> None:
    """No per-weight progress bars from diffusers/transformers: our stderr is for our own progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _to(module, device, dtype):
    """Move a module built in fp32; cast only when another dtype is asked for (diffusers warns on any cast)."""
    import torch

    module = module.to(device)
    return module if dtype == torch.float32 else module.to(dtype)


class _AttrDict(dict):
    """A config dict with attribute access (what diffusers' FrozenDict gives a loaded model's .config)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(key) from exc
