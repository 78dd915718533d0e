"""Prompt sources for `make-prompts` (VidProM CSV/Parquet, Parquet/JSONL with a `prompt` column, plain text, a
Hugging Face dataset read offline, the toy grammar) and the filter chain of EVAL.md section 4.4 (clean, NSFW scores,
language, length, blocklist, dedupe, VBench decontamination, deterministic limit), each step counted.

No torch: `plan()` reads and filters the source to show counts under --dry-run. pyarrow is imported lazily.
"""

from __future__ import annotations

import csv
import hashlib
import html
import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from tmdcli.errors import UsageError

# Detoxify probabilities in VidProM_unique.csv (EVAL.md 4.1).
NSFW_COLUMNS = ("toxicity", "obscene", "identity_attack", "insult", "threat", "sexual_explicit")
KEY_COLUMNS = ("uuid", "id", "key")  # the first one present becomes `source_key`
TOY_SPLITS = {"toy": "train", "toy-heldout": "heldout", "toy-all": "all"}
DEFAULT_TOY_COUNT = 1024
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".txt": "text", ".text": "text", ".lst": "text"}
VIDPROM_LICENSE = "CC-BY-NC-4.0 (VidProM)"


# --------------------------------------------------------------------------------------------------------------
# Parsing --source


@dataclass(frozen=True)
class SourceSpec:
    """A parsed `--source`: a file of a known format, a Hugging Face dataset on this machine, or the toy grammar."""

    kind: str  # "file", "hf" or "toy"
    path: Path | None = None  # the file; for hf the save_to_disk folder or the cached snapshot folder
    format: str | None = None  # csv, parquet, jsonl, text; hf-saved (save_to_disk) or hf-snapshot (hub cache)
    toy_split: str | None = None  # train, heldout, all
    toy_count: int = 0
    dataset: str | None = None  # hf: the repo id or folder as given
    split: str | None = None  # hf: the split (None: a saved single Dataset, or "train")

    def describe(self) -> str:
        if self.kind == "toy":
            return f"toy grammar, {self.toy_split} split, {self.toy_count} captions"
        if self.kind == "hf":
            where = f"snapshot {self.path}" if self.format == "hf-snapshot" else "save_to_disk folder"
            return f"hf:{self.dataset}" + (f" split {self.split}" if self.split else "") + f" ({where})"
        return f"{self.path} ({self.format})"


def parse_source(text: str) -> SourceSpec:
    """`toy`, `toy:COUNT`, `toy-heldout[:COUNT]`, `toy-all[:COUNT]`, or a file path (format from its extension)."""
    text = (text or "").strip()
    if not text:
        raise UsageError("--source is empty", hint="give a prompt file (csv, parquet, jsonl, txt) or toy[:COUNT]")
    if text.startswith(HF_PREFIX):
        return parse_hf_source(text)
    head, sep, count_text = text.partition(":")
    if head in TOY_SPLITS and not Path(text).exists():
        count = DEFAULT_TOY_COUNT
        if sep:
            try:
                count = int(count_text)
            except ValueError:
                raise UsageError(f"--source {text}: COUNT must be an integer", hint="e.g. --source toy:512") from None
            if count < 1:
                raise UsageError(f"--source {text}: COUNT must be >= 1")
        return SourceSpec(kind="toy", toy_split=TOY_SPLITS[head], toy_count=count)
    path = Path(text).expanduser()
    if not path.exists():
        raise UsageError(f"prompt source {path} does not exist",
                         hint="give a local file (VidProM CSV, Parquet/JSONL with a 'prompt' column, or a text "
                              "file with one prompt per line), or toy[:COUNT]; the VidProM CSV is downloaded by "
                              "you (CC BY-NC 4.0), tmd never ships it")
    if not path.is_file():
        raise UsageError(f"prompt source {path} is not a file")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot tell the format of {path} from its extension {path.suffix or '(none)'}",
                         hint="use .csv, .parquet, .jsonl or .txt (one prompt per line)")
    return SourceSpec(kind="file", path=path, format=fmt)


# --------------------------------------------------------------------------------------------------------------
# hf:DATASET[:SPLIT], a Hugging Face dataset already on this machine (never downloaded)

HF_PREFIX = "hf:"
HF_DEFAULT_SPLIT = "train"


def _hf_missing(name: str, where: str) -> UsageError:
    # "does not exist" lets a dry run show the missing source as a plan line (stages/make_prompts.py)
    return UsageError(f"Hugging Face dataset {name} does not exist on this machine ({where}); tmd reads datasets "
                      f"offline and never downloads one",
                      hint=f"fetch it with `hf download --repo-type dataset {name}`, or pass a folder written by "
                           f"datasets' Dataset.save_to_disk as hf:FOLDER")


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk` (dataset_dict.json)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def parse_hf_source(text: str) -> SourceSpec:
    """`hf:NAME[:SPLIT]`: NAME a folder saved by `save_to_disk`, or a dataset repo id whose snapshot is in the
    local Hugging Face cache (`hf download --repo-type dataset NAME`); located without the network."""
    name, _, split = text[len(HF_PREFIX):].partition(":")
    name, split = name.strip(), split.strip() or None
    if not name:
        raise UsageError(f"--source {text}: no dataset named", hint="e.g. --source hf:WenhaoWang/VidProM:train")
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not is_saved_dataset(folder):
            raise UsageError(f"--source {text}: {folder} is not a folder written by save_to_disk (no state.json "
                             f"or dataset_dict.json)", hint="pass a data file (csv, parquet, jsonl) directly instead")
        return SourceSpec(kind="hf", path=folder, format="hf-saved", dataset=name, split=split)
    if "/" not in name or name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise _hf_missing(name, f"no folder {folder}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, HFValidationError):
        from tmdcli.data.expanders import hf_hub_cache

        raise _hf_missing(name, f"not in the cache {hf_hub_cache()}") from None
    return SourceSpec(kind="hf", path=snapshot, format="hf-snapshot", dataset=name,
                      split=split or HF_DEFAULT_SPLIT)


def _hf_identity(spec: SourceSpec) -> dict:
    """A cached snapshot is named by its commit (content-addressed); a saved folder by the sha256 of its files."""
    identity = {"role": "source", "name": spec.dataset, "format": spec.format, "split": spec.split}
    if spec.format == "hf-snapshot":
        return {**identity, "revision": spec.path.name}
    digest = hashlib.sha256()
    for file in sorted(p for p in spec.path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(spec.path).as_posix()}\0{sha256_of_file(file)}\0".encode())
    return {**identity, "sha256": digest.hexdigest()}


def _read_hf(spec: SourceSpec) -> SourceTable:
    """The dataset's rows through `datasets` (memory-mapped Arrow), then the same columns as a Parquet file."""
    import datasets
    import pyarrow as pa

    label = f"hf:{spec.dataset}"
    try:
        if spec.format == "hf-saved":
            loaded = datasets.load_from_disk(str(spec.path))
        else:  # a local folder: the packaged csv/parquet/json builders, no hub call
            loaded = datasets.load_dataset(str(spec.path), split=spec.split)
    except ValueError as exc:  # an unknown split, a folder datasets cannot read
        raise UsageError(f"{label}: datasets cannot load {spec.path}: {str(exc).splitlines()[0]}",
                         hint="check the split name (hf:NAME:SPLIT) and the folder") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = spec.split or HF_DEFAULT_SPLIT
        if split not in loaded:
            raise UsageError(f"{label} has no split {split!r} (splits: {', '.join(loaded)})",
                             hint=f"name one: --source hf:{spec.dataset}:SPLIT")
        loaded = loaded[split]
    elif spec.format == "hf-saved" and spec.split:
        raise UsageError(f"{label} is a single saved Dataset, which has no splits",
                         hint=f"drop ':{spec.split}': --source hf:{spec.dataset}")
    columns = list(loaded.column_names)
    if "prompt" not in columns:
        raise _missing_prompt_column(Path(label), columns)
    wanted = [c for c in columns if c == "prompt" or c in KEY_COLUMNS or c in NSFW_COLUMNS]
    table = loaded.select_columns(wanted).with_format("arrow")[:]  # a pyarrow.Table of every row
    prompt_type = table.schema.field("prompt").type
    if not (pa.types.is_string(prompt_type) or pa.types.is_large_string(prompt_type)):
        raise UsageError(f"{label}: column 'prompt' holds {prompt_type}, not text")
    return _table_to_source(Path(label), table, columns)


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_identity(spec: SourceSpec) -> dict:
    """What the output depends on: the file's content (not its path) and format, or the toy split and count."""
    if spec.kind == "toy":
        return {"role": "source", "name": "toy-grammar", "split": spec.toy_split, "count": spec.toy_count}
    if spec.kind == "hf":
        return _hf_identity(spec)
    return {"role": "source", "name": spec.path.name, "format": spec.format, "sha256": sha256_of_file(spec.path)}


# --------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class SourceTable:
    """The rows of a source, as parallel lists (1.67M VidProM rows stay a few hundred MB)."""

    keys: list[str]
    texts: list[str]
    nsfw: list[float | None]  # max over the NSFW score columns present; None when unscored
    specs: list[str]  # toy scene JSON, "" for files
    nsfw_columns: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()  # every column the source file has
    is_vidprom: bool = False

    def __len__(self) -> int:
        return len(self.texts)


def read_source(spec: SourceSpec, *, seed: int, two_object_prob: float = 0.0) -> SourceTable:
    """Read every row of a source (toy captions are sampled deterministically from `seed`)."""
    if spec.kind == "toy":
        return _read_toy(spec, seed=seed, two_object_prob=two_object_prob)
    if spec.kind == "hf":
        table = _read_hf(spec)
    else:
        reader = {"csv": _read_csv, "parquet": _read_parquet, "jsonl": _read_jsonl, "text": _read_text}[spec.format]
        table = reader(spec.path)
    if len(table) == 0:
        raise UsageError(f"prompt source {spec.describe()} holds no rows", hint="one prompt per row or line")
    name = (spec.dataset or spec.path.name).lower()
    table.is_vidprom = ("vidprom" in name or "prompts4video" in name
                        or (bool(table.nsfw_columns) and "uuid" in table.columns))
    return table


def _read_toy(spec: SourceSpec, *, seed: int, two_object_prob: float) -> SourceTable:
    from tmdcli.toy import grammar

    scenes = grammar.sample_scenes(spec.toy_count, seed=seed, split=spec.toy_split, two_object_prob=two_object_prob)
    specs = [json.dumps({**s.to_dict(), "split": grammar.split_of(s)}, sort_keys=True) for s in scenes]
    return SourceTable(keys=[f"toy-{i}" for i in range(len(scenes))], texts=[grammar.caption(s) for s in scenes],
                       nsfw=[None] * len(scenes), specs=specs)


def _missing_prompt_column(path: Path, columns) -> UsageError:
    shown = ", ".join(map(str, columns)) or "(none)"
    return UsageError(f"{path} has no 'prompt' column (columns: {shown})",
                      hint="VidProM's CSV has uuid, prompt, time and six NSFW score columns; a Parquet, CSV or "
                           "JSONL source needs a 'prompt' column; a plain text file (.txt) holds one prompt a line")


def _table_to_source(path: Path, table, columns: list[str]) -> SourceTable:
    """Rows of a pyarrow table (prompt, optional key and NSFW columns) into a SourceTable."""
    texts = [t if isinstance(t, str) else "" for t in table.column("prompt").to_pylist()]
    key_column = next((c for c in KEY_COLUMNS if c in columns), None)
    if key_column is not None:
        keys = ["" if k is None else str(k) for k in table.column(key_column).to_pylist()]
    else:
        keys = [str(i) for i in range(len(texts))]
    nsfw_columns = tuple(c for c in NSFW_COLUMNS if c in columns)
    nsfw: list[float | None] = [None] * len(texts)
    if nsfw_columns:
        import pyarrow as pa
        import pyarrow.compute as pc

        scores = []
        for c in nsfw_columns:
            try:
                scores.append(pc.cast(table.column(c), pa.float64()))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise UsageError(f"{path}: NSFW column {c!r} is not numeric ({exc})") from None
        nsfw = pc.max_element_wise(*scores, skip_nulls=True).to_pylist()  # null only when every score is null
    return SourceTable(keys=keys, texts=texts, nsfw=nsfw, specs=[""] * len(texts), nsfw_columns=nsfw_columns,
                       columns=tuple(columns))


def _read_csv(path: Path) -> SourceTable:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), [])
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text", hint="save the CSV as UTF-8") from None
    header = [h.strip() for h in header]
    if "prompt" not in header:
        raise _missing_prompt_column(path, header)
    wanted = [c for c in header if c == "prompt" or c in KEY_COLUMNS or c in NSFW_COLUMNS]
    types = {c: (pa.float64() if c in NSFW_COLUMNS else pa.string()) for c in wanted}
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=header, skip_rows=1),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(include_columns=wanted, column_types=types,
                                                 strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise UsageError(f"malformed CSV {path}: {exc}",
                         hint="check quoting and the number of fields per row") from None
    return _table_to_source(path, table, header)


def _read_parquet(path: Path) -> SourceTable:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        columns = list(pq.read_schema(path).names)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UsageError(f"{path} is not a readable Parquet file: {exc}") from None
    if "prompt" not in columns:
        raise _missing_prompt_column(path, columns)
    wanted = [c for c in columns if c == "prompt" or c in KEY_COLUMNS or c in NSFW_COLUMNS]
    try:
        table = pq.read_table(path, columns=wanted)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UsageError(f"{path} is not a readable Parquet file: {exc}") from None
    if not pa.types.is_string(table.schema.field("prompt").type) and not pa.types.is_large_string(
            table.schema.field("prompt").type):
        raise UsageError(f"{path}: column 'prompt' holds {table.schema.field('prompt').type}, not text")
    return _table_to_source(path, table, columns)


def _read_jsonl(path: Path) -> SourceTable:
    keys, texts, nsfw = [], [], []
    columns: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} line {number} is not JSON ({exc.msg})",
                             hint='JSONL holds one object per line, e.g. {"prompt": "a cat surfing"}') from None
        if not isinstance(row, dict) or "prompt" not in row:
            raise _missing_prompt_column(path, sorted(row) if isinstance(row, dict) else [])
        columns.update(row)
        text = row["prompt"]
        if text is not None and not isinstance(text, str):
            raise UsageError(f"{path} line {number}: 'prompt' is {type(text).__name__}, not text")
        texts.append(text or "")
        key = next((row[c] for c in KEY_COLUMNS if row.get(c) is not None), number)
        keys.append(str(key))
        scores = []
        for c in NSFW_COLUMNS:
            value = row.get(c)
            if value is None:
                continue
            try:
                scores.append(float(value))
            except (TypeError, ValueError):
                raise UsageError(f"{path} line {number}: NSFW score {c}={value!r} is not a number") from None
        nsfw.append(max(scores) if scores else None)
    return SourceTable(keys=keys, texts=texts, nsfw=nsfw, specs=[""] * len(texts),
                       nsfw_columns=tuple(c for c in NSFW_COLUMNS if c in columns), columns=tuple(sorted(columns)))


def _read_text(path: Path) -> SourceTable:
    try:
        data = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text", hint="a text source holds one prompt per line") from None
    if "\x00" in data:
        raise UsageError(f"{path} looks binary, not a text file of prompts")
    lines = data.splitlines()
    return SourceTable(keys=[str(i) for i in range(1, len(lines) + 1)], texts=lines, nsfw=[None] * len(lines),
                       specs=[""] * len(lines))


# --------------------------------------------------------------------------------------------------------------
# VBench prompt list


@dataclass(frozen=True)
class VBenchList:
    normalised: frozenset[str]
    origin: str  # the file, or "vbench <version> (installed)"
    identity: dict


def load_vbench_prompts(path: Path | None) -> VBenchList | None:
    """VBench prompts to drop: from `path` (text, one per line, or VBench_full_info.json), else from the installed
    `vbench` package's VBench_full_info.json (located without importing vbench), else None."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UsageError(f"VBench prompt list {path} does not exist",
                             hint="e.g. VBench's prompts/all_dimension.txt, one prompt per line")
        return VBenchList(frozenset(_vbench_lines(path)), str(path),
                          {"role": "vbench-prompts", "name": path.name, "sha256": sha256_of_file(path)})
    try:
        found = importlib.util.find_spec("vbench")
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        return None
    info = Path(list(found.submodule_search_locations)[0]) / "VBench_full_info.json"
    if not info.is_file():
        return None
    identity = {"role": "vbench-prompts", "name": "vbench:VBench_full_info.json", "sha256": sha256_of_file(info)}
    return VBenchList(frozenset(_vbench_lines(info)), f"{info} (installed vbench)", identity)


def _vbench_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"VBench prompt list {path} is not UTF-8 text") from None
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(text)
            prompts = [e["prompt_en"] for e in entries]
        except (json.JSONDecodeError, TypeError, KeyError):
            raise UsageError(f"{path} is not a VBench_full_info.json list of {{'prompt_en': ...}}") from None
    else:
        prompts = text.splitlines()
    return [n for n in (normalise(p) for p in prompts) if n]


# --------------------------------------------------------------------------------------------------------------
# Cleaning and filtering


_PIKA_NEG = re.compile(r"(?:^|\s)-neg\b.*$", re.IGNORECASE | re.DOTALL)
_PIKA_CAMERA = re.compile(r"(?:^|\s)-camera\s+(?:zoom|pan|rotate)\s+[\w-]+(?:\s+(?:left|right|up|down))?",
                          re.IGNORECASE)
_PIKA_FLAGS = re.compile(r"(?:^|\s)-(?:ar|motion|gs|fps|seed)\s+[\w:.]+", re.IGNORECASE)
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_DISCORD = re.compile(r"<a?:\w+:\d+>|<[@#][!&]?\d+>|\bImage\s+#\d+\b|\S+\.(?:png|jpe?g|gif|webp|mp4)\b",
                      re.IGNORECASE)
_NON_WORD = re.compile(r"[\W_]+")


def clean_text(text: str) -> str:
    """HTML-unescape; strip Pika flags (everything after `-neg`), URLs and Discord residue; collapse whitespace."""
    # Each pattern runs only when a cheap substring test says it can match: 1.67M VidProM rows stay fast.
    if "&" in text:
        text = html.unescape(text)
    if "-" in text:
        text = _PIKA_FLAGS.sub(" ", _PIKA_CAMERA.sub(" ", _PIKA_NEG.sub(" ", text)))
    lowered = text.lower()
    if "http" in lowered or "www." in lowered:
        text = _URL.sub(" ", text)
    if "<" in text or "." in text or "#" in text:
        text = _DISCORD.sub(" ", text)
    return " ".join(text.split())


def normalise(text: str) -> str:
    """Dedupe/match key: case-folded, punctuation removed, whitespace collapsed."""
    return _NON_WORD.sub(" ", text.casefold()).strip()


def ascii_letter_ratio(text: str) -> float:
    if text.isascii():
        return 1.0
    letters = [c for c in text if c.isalpha()]
    return 1.0 if not letters else sum(c.isascii() for c in letters) / len(letters)


@dataclass(frozen=True, kw_only=True)
class FilterConfig:
    """The filter chain's settings (EVAL.md 4.4); the stage config passes them down."""

    clean: bool = True
    nsfw_threshold: float | None = 0.1  # drop when the max NSFW score > threshold; None: off
    min_ascii_letter_ratio: float = 0.9  # the cheap English test; 0: off
    min_words: int = 3
    max_words: int = 120  # 0: no upper bound
    blocklist: tuple[str, ...] = ()  # words; a prompt holding one (case-folded, whole word) is dropped
    dedupe: bool = True
    drop_vbench: bool = True
    limit: int | None = None  # applied last, as a seeded subset in source order
    seed: int = 0


@dataclass(frozen=True)
class FilterStep:
    step: str
    num_in: int
    num_out: int
    setting: str = ""

    @property
    def dropped(self) -> int:
        return self.num_in - self.num_out

    def to_dict(self) -> dict:
        return {"step": self.step, "in": self.num_in, "out": self.num_out, "dropped": self.dropped,
                "setting": self.setting}


@dataclass
class Prepared:
    """The prompts that survive the chain, in source order, with the steps' counts."""

    keys: list[str]
    texts: list[str]
    specs: list[str]
    steps: list[FilterStep] = field(default_factory=list)
    num_source_rows: int = 0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def dropped(self) -> dict[str, int]:
        return {s.step: s.dropped for s in self.steps}


def apply_filters(table: SourceTable, cfg: FilterConfig, vbench: VBenchList | None, *,
                  toy: bool = False) -> Prepared:
    """Run the chain over a source's rows. Toy captions skip every filter but the limit (they are clean by
    construction, and repeated captions are different scenes)."""
    rows = list(range(len(table)))
    texts = list(table.texts)
    steps: list[FilterStep] = []
    notes: list[str] = []

    def keep(step: str, predicate, setting: str = "") -> None:
        nonlocal rows
        before = len(rows)
        rows = [i for i in rows if predicate(i)]
        steps.append(FilterStep(step, before, len(rows), setting))

    if toy:
        notes.append("toy source: filters not applied (captions are clean by construction)")
    else:
        if cfg.nsfw_threshold is not None and table.nsfw_columns:
            tau = cfg.nsfw_threshold
            keep("nsfw", lambda i: table.nsfw[i] is None or table.nsfw[i] <= tau,
                 f"max({', '.join(table.nsfw_columns)}) <= {tau}")
        elif cfg.nsfw_threshold is not None and table.columns:  # a table without scores (text files never have any)
            notes.append("nsfw: no score columns in the source; skipped")
        tidy = clean_text if cfg.clean else (lambda t: " ".join(t.split()))
        for i in rows:  # only the rows still in: cleaning is the chain's most expensive step
            texts[i] = tidy(texts[i])
        keep("empty", lambda i: bool(texts[i]), "cleaned text is empty" if cfg.clean else "text is empty")
        if cfg.min_ascii_letter_ratio > 0:
            keep("not_english", lambda i: ascii_letter_ratio(texts[i]) >= cfg.min_ascii_letter_ratio,
                 f"ascii letters >= {cfg.min_ascii_letter_ratio:.0%}")
        words = {i: len(texts[i].split()) for i in rows}
        keep("too_short", lambda i: words[i] >= cfg.min_words, f"words >= {cfg.min_words}")
        if cfg.max_words > 0:
            keep("too_long", lambda i: words[i] <= cfg.max_words, f"words <= {cfg.max_words}")
        if cfg.blocklist:
            blocked = {w.casefold() for w in cfg.blocklist}
            keep("blocklist", lambda i: not blocked.intersection(normalise(texts[i]).split()),
                 f"{len(blocked)} words")
        if cfg.dedupe:
            seen: set[str] = set()

            def first_time(i: int) -> bool:
                key = normalise(texts[i])
                if key in seen:
                    return False
                seen.add(key)
                return True

            keep("duplicate", first_time, "case and punctuation ignored")
        if cfg.drop_vbench and vbench is not None:
            keep("vbench", lambda i: normalise(texts[i]) not in vbench.normalised,
                 f"{len(vbench.normalised)} prompts from {vbench.origin}")
        elif cfg.drop_vbench:
            notes.append("vbench: no prompt list (--vbench-prompts FILE, or install vbench); skipped")
    if cfg.limit is not None and cfg.limit < len(rows):
        # A seeded subset, kept in source order: ids stay stable and the sample is not biased by file order.
        chosen = set(random.Random(f"make-prompts-limit:{cfg.seed}").sample(range(len(rows)), cfg.limit))
        before = len(rows)
        rows = [r for j, r in enumerate(rows) if j in chosen]
        steps.append(FilterStep("limit", before, len(rows), f"seeded subset of {cfg.limit}"))
    return Prepared(keys=[table.keys[i] for i in rows], texts=[texts[i] for i in rows],
                    specs=[table.specs[i] for i in rows], steps=steps, num_source_rows=len(table), notes=notes)
