"""VBench, the pure part (EVAL.md 2.2-2.5, 7.1-7.2): the 16 dimensions and their scoring constants, the Quality /
Semantic / Total scorer, the standard prompt suite and the file names VBench expects, and result parsing.

No torch and no subprocess here; `vbench_runner.py` runs VBench in its own interpreter. Dimension keys are VBench's
JSON keys (`subject_consistency`), not the display names of its scoring script (`subject consistency`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

QUALITY, SEMANTIC = "quality", "semantic"
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0  # scripts/constant.py: Total = (4 Quality + Semantic) / 5
SAMPLES_PER_PROMPT = 5  # the standard loader reads {prompt}-0 .. {prompt}-4 only
FPS = 16  # dynamic_degree subsamples by the container fps; Wan writes 16 fps
MAX_NAME_BYTES = 250  # file-name limit 255 minus "-4.mp4"


@dataclass(frozen=True)
class Dimension:
    """One VBench dimension with its min-max normalisation constants (scripts/constant.py)."""

    name: str
    group: str
    min: float
    max: float
    weight: float = 1.0


DIMENSIONS: dict[str, Dimension] = {d.name: d for d in (
    Dimension("subject_consistency", QUALITY, 0.1462, 1.0),
    Dimension("background_consistency", QUALITY, 0.2615, 1.0),
    Dimension("temporal_flickering", QUALITY, 0.6293, 1.0),
    Dimension("motion_smoothness", QUALITY, 0.706, 0.9975),
    Dimension("dynamic_degree", QUALITY, 0.0, 1.0, weight=0.5),
    Dimension("aesthetic_quality", QUALITY, 0.0, 1.0),
    Dimension("imaging_quality", QUALITY, 0.0, 1.0),
    Dimension("object_class", SEMANTIC, 0.0, 1.0),
    Dimension("multiple_objects", SEMANTIC, 0.0, 1.0),
    Dimension("human_action", SEMANTIC, 0.0, 1.0),
    Dimension("color", SEMANTIC, 0.0, 1.0),
    Dimension("spatial_relationship", SEMANTIC, 0.0, 1.0),
    Dimension("scene", SEMANTIC, 0.0, 0.8222),
    Dimension("appearance_style", SEMANTIC, 0.0009, 0.2855),
    Dimension("temporal_style", SEMANTIC, 0.0, 0.364),
    Dimension("overall_consistency", SEMANTIC, 0.0, 0.364),
)}


def group_dimensions(group: str) -> list[str]:
    return [d.name for d in DIMENSIONS.values() if d.group == group]


# --------------------------------------------------------------------------------------------------------------
# Scoring (scripts/cal_final_score.py, except that a missing dimension raises instead of counting as 0)


@dataclass(frozen=True)
class VBenchScore:
    """Quality, Semantic and Total in [0, 1] (papers print them x100), and each normalised dimension."""

    quality: float
    semantic: float
    total: float
    normalised: dict[str, float]


def check_dimensions(names: Sequence[str]) -> None:
    """Raise ValueError on a dimension VBench does not have."""
    unknown = sorted(set(names) - set(DIMENSIONS))
    if unknown:
        raise ValueError(f"unknown VBench dimension(s): {', '.join(unknown)} (known: {', '.join(DIMENSIONS)})")


def normalise(name: str, raw: float) -> float:
    """(raw - Min) / (Max - Min) * weight, not clipped: below Min gives a negative contribution, as in VBench."""
    d = DIMENSIONS[name]
    return (float(raw) - d.min) / (d.max - d.min) * d.weight


def group_score(raw: Mapping[str, float], group: str) -> float:
    """Weighted mean of a group's normalised dimensions (Quality divides by 6.5, Semantic by 9).

    Raises ValueError when a dimension of the group is missing: the official script would score it 0.
    """
    names = group_dimensions(group)
    missing = [n for n in names if n not in raw]
    if missing:
        raise ValueError(f"{group} score needs every {group} dimension; missing: {', '.join(missing)}")
    return sum(normalise(n, raw[n]) for n in names) / sum(DIMENSIONS[n].weight for n in names)


def total_from(quality: float, semantic: float) -> float:
    """VBench Total = (QUALITY_WEIGHT * Quality + SEMANTIC_WEIGHT * Semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)."""
    return (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)


def score(raw: Mapping[str, float]) -> VBenchScore:
    """Score the 16 raw dimension values; raises ValueError on a missing or unknown dimension."""
    check_dimensions(list(raw))
    quality, semantic = group_score(raw, QUALITY), group_score(raw, SEMANTIC)
    return VBenchScore(quality=quality, semantic=semantic, total=total_from(quality, semantic),
                       normalised={n: normalise(n, raw[n]) for n in DIMENSIONS})


def partial_score(raw: Mapping[str, float]) -> dict:
    """What a subset of dimensions allows: every normalised value, plus each group (and Total) that is complete."""
    check_dimensions(list(raw))
    out: dict = {"normalised": {n: normalise(n, v) for n, v in raw.items()}}
    for group in (QUALITY, SEMANTIC):
        if all(n in raw for n in group_dimensions(group)):
            out[group] = group_score(raw, group)
    if QUALITY in out and SEMANTIC in out:
        out["total"] = total_from(out[QUALITY], out[SEMANTIC])
    return out


# --------------------------------------------------------------------------------------------------------------
# Results written by VBench: <name>_eval_results.json = {dimension: [aggregate, [{video_path, video_results}]]}


def parse_eval_results(data: Mapping) -> dict[str, float]:
    """The aggregate (first element) of every dimension in a VBench result JSON object."""
    if not isinstance(data, Mapping) or not data:
        raise ValueError("a VBench result file holds a JSON object {dimension: [aggregate, per_video]}")
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"VBench result for {name!r} is not [aggregate, per_video_list]")
        out[name] = float(entry[0])
    check_dimensions(list(out))
    return out


def read_eval_results(path: str | Path) -> dict[str, float]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read VBench results {path}: {exc}") from exc
    return parse_eval_results(data)


def videos_scored(data: Mapping, dimension: str) -> list[str]:
    """The video paths VBench scored for one dimension (from its per-video list)."""
    return [v["video_path"] for v in data[dimension][1]]


# --------------------------------------------------------------------------------------------------------------
# The standard prompt suite (VBench_full_info.json) and the files it expects


@dataclass(frozen=True)
class SuitePrompt:
    """One distinct prompt to generate: its index in the full list (seeds derive from it) and its dimensions."""

    index: int
    prompt: str  # the short VBench prompt: file names and semantic scoring use it
    dimensions: tuple[str, ...]
    generate_from: str  # what the model is given: the short prompt or its augmented rewrite


def load_full_info(path: str | Path) -> list[dict]:
    """Read VBench_full_info.json: [{"prompt_en", "dimension": [...], "auxiliary_info"?}, ...]."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the VBench prompt list {path}: {exc}") from exc
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "prompt_en" in e and "dimension" in e
                                                 for e in entries):
        raise ValueError(f"{path} is not a VBench full-info list ([{{'prompt_en', 'dimension'}}, ...])")
    return entries


def suite_prompts(full_info: Sequence[dict], dimensions: Sequence[str],
                  augmented: Mapping[str, str] | None = None) -> list[SuitePrompt]:
    """Distinct prompts of the chosen dimensions, in full-list order; a prompt listed twice is generated once.

    `index` is the prompt's first position in the whole list, so seeds do not change with the dimension subset.
    """
    check_dimensions(dimensions)
    wanted = set(dimensions)
    first: dict[str, int] = {}
    dims: dict[str, set] = {}
    for i, entry in enumerate(full_info):
        prompt = entry["prompt_en"]
        first.setdefault(prompt, i)
        dims.setdefault(prompt, set()).update(entry["dimension"])
    chosen = [p for p in first if dims[p] & wanted]
    if augmented is not None:
        missing = [p for p in chosen if p not in augmented]
        if missing:
            raise ValueError(f"{len(missing)} prompt(s) have no augmented version, e.g. {missing[0]!r}")
    return [SuitePrompt(index=first[p], prompt=p, dimensions=tuple(sorted(dims[p] & wanted)),
                        generate_from=augmented[p] if augmented is not None else p) for p in chosen]


def check_file_names(prompts: Sequence[SuitePrompt]) -> None:
    """VBench finds a video by `{prompt}-{i}.mp4`; refuse prompts that cannot be such a file name."""
    for p in prompts:
        if "/" in p.prompt or "\0" in p.prompt or len(p.prompt.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"VBench prompt {p.prompt[:60]!r} cannot be a file name (a '/' or over "
                             f"{MAX_NAME_BYTES} bytes)")


def video_name(prompt: str, index: int) -> str:
    """The file name VBench's standard mode looks for (vbench/__init__.py, build_full_info_json)."""
    return f"{prompt}-{index}.mp4"


def video_seed(base_seed: int, prompt_index: int, sample: int,
               samples_per_prompt: int = SAMPLES_PER_PROMPT) -> int:
    """seed = base + K * prompt_index + i (EVAL.md 7.1): recorded per video, equal for every model."""
    return base_seed + samples_per_prompt * prompt_index + sample


def read_augmented(path: str | Path) -> dict[str, str]:
    """Augmented prompts keyed by the short prompt: a JSON object, or TSV lines `short<TAB>augmented`.

    VBench and Self-Forcing ship aligned text files; `paste all_dimension.txt all_dimension_extended.txt`
    turns such a pair into the TSV form.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{path}: expected a JSON object {{short prompt: augmented prompt}}")
        return {k.strip(): v.strip() for k, v in data.items()}
    out = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        short, tab, long = line.partition("\t")
        if not tab or not long.strip():
            raise ValueError(f"{path}:{number}: expected `short prompt<TAB>augmented prompt`")
        out[short.strip()] = long.strip()
    return out


# --------------------------------------------------------------------------------------------------------------
# Weights each dimension needs (EVAL.md 2.2 and 2.7), relative to $VBENCH_CACHE_DIR unless marked


@dataclass(frozen=True)
class Requirement:
    what: str
    root: str  # "cache" ($VBENCH_CACHE_DIR), "torch" ($TORCH_HOME) or "hf" (the Hugging Face hub cache)
    path: str  # file or folder under root
    source: str  # where it comes from, for the error message


_CLIP_B32 = Requirement("CLIP ViT-B/32", "cache", "clip_model/ViT-B-32.pt", "openai/CLIP")
_RAFT = Requirement("RAFT (things)", "cache", "raft_model/models/raft-things.pth", "princeton-vl/RAFT")
_GRIT = (Requirement("GRiT dense captioner", "cache", "grit_model/grit_b_densecap_objectdet.pth", "JialianW/GRiT"),
         Requirement("bert-base-uncased tokenizer", "hf", "models--bert-base-uncased", "google-bert/bert-base-uncased"))
_VICLIP = (Requirement("ViCLIP", "cache", "ViCLIP/ViClip-InternVid-10M-FLT.pth", "OpenGVLab/InternVideo"),
           Requirement("ViCLIP BPE vocabulary", "cache", "ViCLIP/bpe_simple_vocab_16e6.txt.gz", "openai/CLIP"))

REQUIREMENTS: dict[str, tuple[Requirement, ...]] = {
    "subject_consistency": (
        Requirement("DINO ViT-B/16", "cache", "dino_model/dino_vitbase16_pretrain.pth", "facebookresearch/dino"),
        Requirement("facebookresearch/dino clone", "cache", "dino_model/facebookresearch_dino_main/hubconf.py",
                    "github.com/facebookresearch/dino"),
        Requirement("DINO ViT-B/16 (torch hub copy)", "torch", "hub/checkpoints/dino_vitbase16_pretrain.pth",
                    "facebookresearch/dino")),
    "background_consistency": (_CLIP_B32,),
    "temporal_flickering": (_RAFT,),  # the static filter runs RAFT first
    "motion_smoothness": (Requirement("AMT-S", "cache", "amt_model/amt-s.pth", "MCG-NKU/AMT"),),
    "dynamic_degree": (_RAFT,),
    "aesthetic_quality": (
        Requirement("LAION aesthetic head", "cache", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
                    "LAION-AI/aesthetic-predictor"),
        Requirement("CLIP ViT-L/14", "cache", "clip_model/ViT-L-14.pt", "openai/CLIP")),
    "imaging_quality": (Requirement("MUSIQ (SPAQ)", "cache", "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
                                    "chaofengc/IQA-PyTorch"),),
    "object_class": _GRIT,
    "multiple_objects": _GRIT,
    "color": _GRIT,
    "spatial_relationship": _GRIT,
    "human_action": (Requirement("UMT ViT-L/16 (Kinetics-400)", "cache",
                                 "umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth", "OpenGVLab/unmasked_teacher"),),
    "scene": (Requirement("Tag2Text Swin-B", "cache", "caption_model/tag2text_swin_14m.pth",
                          "xinyu1205/recognize-anything"),
              Requirement("bert-base-uncased", "hf", "models--bert-base-uncased", "google-bert/bert-base-uncased")),
    "appearance_style": (_CLIP_B32,),
    "temporal_style": _VICLIP,
    "overall_consistency": _VICLIP,
}

# Python modules the VBench interpreter must have, beyond vbench itself.
MODULES: dict[str, tuple[str, ...]] = {d: ("detectron2",) for d in ("object_class", "multiple_objects", "color",
                                                                     "spatial_relationship")}


def requirements_for(dimensions: Sequence[str]) -> list[Requirement]:
    """Every file the chosen dimensions need, each once, in dimension order."""
    seen, out = set(), []
    for name in dimensions:
        for req in REQUIREMENTS[name]:
            if (req.root, req.path) not in seen:
                seen.add((req.root, req.path))
                out.append(req)
    return out


def missing_requirements(dimensions: Sequence[str], roots: Mapping[str, Path]) -> list[str]:
    """One line per missing file: what it is, where it was expected, where it comes from. [] = all present."""
    lines = []
    for req in requirements_for(dimensions):
        path = Path(roots[req.root]) / req.path
        present = path.is_dir() and any(path.glob("snapshots/*/vocab.txt")) if req.root == "hf" else path.exists()
        if not present:
            lines.append(f"{req.what}: {path} (from {req.source})")
    return lines
