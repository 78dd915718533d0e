#!/usr/bin/env python3
"""Inspect an artifact, a staging folder, or one shard: manifest summary, files with sizes, and a peek into known
file types (Parquet: schema, rows, value counts; safetensors: tensor names, shapes, dtypes, metadata; tar:
members; JSON/JSONL/text: first lines). Reads headers only where it can; never loads a pickle.

    python data_tools/inspect_artifact.py prompts:latest --home tmd-home
    python data_tools/inspect_artifact.py tmd-home/latents/latents-3f9c2a1b7e0d --rows 3
    python data_tools/inspect_artifact.py tmd-home/videos/.staging-videos-9ab0c1d2e3f4/shards/00000.tar
    python data_tools/inspect_artifact.py prompts:latest --as-dataset   # as a Hugging Face datasets.Dataset

In Python, `open_prompts_dataset(folder)` returns a prompts artifact as a `datasets.Dataset` (map, filter,
push_to_hub, to_pandas ...), the way `tmd make-prompts --source hf:...` reads one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

MAX_FILES = 50  # files listed before "... and N more"
MAX_PEEKS = 2  # peeks per file type in a folder
TEXT_WIDTH = 100


def human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"  # pragma: no cover


def short(value, width: int = TEXT_WIDTH) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# Peeks, one per file type


def peek_parquet(path: Path, rows: int) -> list[str]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    table = pq.read_table(path)
    out = [f"parquet: {meta.num_rows} rows, {meta.num_row_groups} row group(s)",
           "schema: " + ", ".join(f"{f.name}: {f.type}" for f in table.schema)]
    for i, row in enumerate(table.slice(0, rows).to_pylist()):
        out.append(f"row {i}: " + short({k: (short(v, 60) if isinstance(v, str) else v) for k, v in row.items()},
                                        TEXT_WIDTH * 2))
    for field in table.schema:
        if str(field.type) in ("string", "large_string"):
            counts = Counter(table.column(field.name).to_pylist())
            if 1 <= len(counts) <= 20 and len(counts) < max(2, table.num_rows):
                out.append(f"{field.name} counts: " + ", ".join(f"{k or '(empty)'}={v}"
                                                                for k, v in counts.most_common()))
    if "prompt" in table.column_names:
        words = [len((p or "").split()) for p in table.column("prompt").to_pylist()]
        if words:
            ordered = sorted(words)
            out.append(f"prompt words: min {ordered[0]}, median {ordered[len(ordered) // 2]}, max {ordered[-1]}")
    return out


def peek_safetensors(path: Path, rows: int) -> list[str]:
    from safetensors import safe_open

    out = []
    with safe_open(str(path), framework="numpy") as f:  # header only: no tensor is read
        names = list(f.keys())
        metadata = f.metadata() or {}
        total = 0
        lines = []
        for name in names:
            tensor = f.get_slice(name)
            shape, dtype = tensor.get_shape(), tensor.get_dtype()
            count = 1
            for dim in shape:
                count *= dim
            total += count
            lines.append(f"  {name}: {dtype} {list(shape)}")
    out.append(f"safetensors: {len(names)} tensors, {total} elements")
    limit = max(rows * 10, 20)
    out += lines[:limit] + ([f"  ... and {len(lines) - limit} more"] if len(lines) > limit else [])
    if metadata:
        out.append("metadata: " + short(metadata, TEXT_WIDTH * 2))
    return out


def safetensors_header(raw) -> dict:
    """The JSON header of a safetensors stream (8-byte little-endian length, then JSON), without its tensors."""
    size = int.from_bytes(raw.read(8), "little")
    if not 0 < size < 100 << 20:
        raise ValueError("not a safetensors header")
    return json.loads(raw.read(size))


def peek_tar(path: Path, rows: int) -> list[str]:
    inner: list[str] = []
    with tarfile.open(path) as tar:  # member headers, plus small JSON members and safetensors headers
        members = tar.getmembers()
        for m in members:
            if not m.isfile() or len(inner) > rows * 10:
                continue
            if m.name.endswith(".json") and m.size <= 1 << 20 and not inner:
                data = json.loads(tar.extractfile(m).read())
                if isinstance(data, dict):
                    inner.append(f"{m.name}: " + ", ".join(
                        f"{k}=[{len(v)} entries]" if isinstance(v, list) else f"{k}={short(v, 40)}"
                        for k, v in data.items()))
                    for key, value in data.items():
                        if isinstance(value, list):
                            inner += [f"  {key}[{i}]: {short(v)}" for i, v in enumerate(value[:rows])]
            elif m.name.endswith(".safetensors"):
                header = safetensors_header(tar.extractfile(m))
                tensors = {k: v for k, v in header.items() if k != "__metadata__"}
                inner.append(f"{m.name}: {len(tensors)} tensors")
                inner += [f"  {k}: {v['dtype']} {v['shape']}" for k, v in list(tensors.items())[:rows * 2]]
    files = [m for m in members if m.isfile()]
    exts = Counter("".join(Path(m.name).suffixes) or "(none)" for m in files)
    keys = {m.name.split("/")[-1].split(".")[0] for m in files}
    out = [f"tar: {len(members)} members ({len(files)} files, {human(sum(m.size for m in files))}), "
           f"{len(keys)} keys; by extension: " + ", ".join(f"{k}={v}" for k, v in sorted(exts.items()))]
    limit = max(rows * 4, 8)
    out += [f"  {m.name}  {human(m.size)}" for m in members[:limit]]
    if len(members) > limit:
        out.append(f"  ... and {len(members) - limit} more")
    return out + inner


def peek_text(path: Path, rows: int) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [next(f, None) for _ in range(rows)]
    return [f"  {short(line.rstrip())}" for line in lines if line is not None]


def peek_json(path: Path, rows: int) -> list[str]:
    if path.stat().st_size > 4 << 20:
        return peek_text(path, rows)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return peek_text(path, rows)
    if isinstance(data, dict):
        return [f"  {k}: {short(v)}" for k, v in list(data.items())[: rows * 4]]
    return [f"json {type(data).__name__} of {len(data)}"] + [f"  {short(v)}" for v in data[:rows]]


PEEKS = {".parquet": peek_parquet, ".safetensors": peek_safetensors, ".tar": peek_tar, ".jsonl": peek_text,
         ".txt": peek_text, ".json": peek_json, ".csv": peek_text, ".md": peek_text}


def peek(path: Path, rows: int) -> list[str]:
    suffixes = "".join(path.suffixes[-2:])
    fn = PEEKS.get(path.suffix.lower())
    if fn is None and suffixes.endswith((".tar.gz", ".tgz")):
        fn = peek_tar
    if fn is None:
        return []
    try:
        return fn(path, rows)
    except Exception as exc:  # a damaged file is a finding, not a crash
        return [f"cannot read: {type(exc).__name__}: {exc}"]


# --------------------------------------------------------------------------------------------------------------
# Folders and manifests


def manifest_summary(manifest: dict) -> list[str]:
    out = [f"{manifest.get('id')}  ({manifest.get('kind')}, stage {manifest.get('stage')} "
           f"v{manifest.get('stage_version')}, {manifest.get('status')})",
           f"  name: {manifest.get('name')}", f"  created: {manifest.get('created_at')}  "
           f"duration: {manifest.get('duration_s')} s", f"  fingerprint: {manifest.get('fingerprint')}"]
    for entry in manifest.get("inputs", []):
        out.append(f"  input {entry.get('role')}: {entry.get('id')}")
    for entry in manifest.get("external_models", []):
        out.append(f"  external: {short(entry)}")
    for key, value in sorted((manifest.get("facts") or {}).items()):
        out.append(f"  facts.{key}: {short(value)}")
    for key, value in sorted((manifest.get("stats") or {}).items()):
        out.append(f"  stats.{key}: {short(value, TEXT_WIDTH * 2)}")
    return out


def inspect_folder(folder: Path, rows: int) -> list[str]:
    out: list[str] = []
    manifest_path = folder / "manifest.json"
    listed: dict[str, dict] = {}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed = {f["path"]: f for f in manifest.get("files", [])}
        out += manifest_summary(manifest)
    else:
        out.append(f"{folder}: no manifest (a staging folder or a plain folder); files as found on disk")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".hashes" not in p.relative_to(folder).parts)
    total = sum(p.stat().st_size for p in files)
    out.append(f"files: {len(files)}, {human(total)}")
    for path in files[:MAX_FILES]:
        rel = path.relative_to(folder).as_posix()
        note = ""
        if listed:
            entry = listed.get(rel)
            if rel == "manifest.json":
                note = ""
            elif entry is None:
                note = "  (not in manifest)"
            elif entry["bytes"] != path.stat().st_size:
                note = f"  (manifest says {entry['bytes']} bytes)"
        out.append(f"  {rel}  {human(path.stat().st_size)}{note}")
    if len(files) > MAX_FILES:
        out.append(f"  ... and {len(files) - MAX_FILES} more")
    missing = sorted(set(listed) - {p.relative_to(folder).as_posix() for p in files})
    out += [f"  missing: {rel}" for rel in missing]
    seen: Counter = Counter()
    for path in sorted(files, key=lambda p: (len(p.relative_to(folder).parts), p.as_posix())):  # top level first
        if path.name == "manifest.json" or seen[path.suffix] >= MAX_PEEKS:
            continue
        lines = peek(path, rows)
        if lines:
            seen[path.suffix] += 1
            out.append(f"-- {path.relative_to(folder).as_posix()}")
            out += lines
    return out


def open_prompts_dataset(path: Path):
    """A prompts artifact (its folder, or its prompts.parquet) as a `datasets.Dataset`, held in memory: nothing is
    written to the datasets cache. Raises UsageError (exit 2) for anything else."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    from tmdcli.errors import UsageError

    file = path / "prompts.parquet" if path.is_dir() else path
    if not file.is_file() or file.suffix != ".parquet":
        raise UsageError(f"--as-dataset opens a prompts artifact; {path} has no prompts.parquet",
                         hint="give prompts:latest, a prompts artifact folder or its prompts.parquet")
    try:
        table = pq.read_table(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UsageError(f"{file} is not a readable Parquet file: {exc}",
                         hint="check the artifact with `tmd verify`") from None
    return datasets.Dataset(InMemoryTable(table))


def dataset_summary(dataset, rows: int) -> list[str]:
    out = [f"datasets.Dataset: {dataset.num_rows} rows",
           "features: " + ", ".join(f"{k}: {v.dtype}" for k, v in dataset.features.items())]
    for i in range(min(rows, dataset.num_rows)):
        out.append(f"row {i}: " + short(dataset[i], TEXT_WIDTH * 2))
    return out


def locate(ref: str, home: Path) -> Path:
    """A path as given, or an artifact reference resolved in `home`."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    from tmdcli.artifacts.store import Store

    return Store(home).resolve(ref).path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref", help="artifact id, name, latest, KIND:latest, a folder, or a single file")
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("TMD_HOME", "tmd-home")),
                        help="tmd home for references (env TMD_HOME, default ./tmd-home)")
    parser.add_argument("--rows", type=int, default=5, help="rows/lines/members shown per peek")
    parser.add_argument("--as-dataset", action="store_true",
                        help="open a prompts artifact as a Hugging Face datasets.Dataset and summarise that")
    args = parser.parse_args(argv)

    from tmdcli.errors import TmdError

    try:
        path = locate(args.ref, args.home)
        if args.as_dataset:
            print("\n".join(dataset_summary(open_prompts_dataset(path), args.rows)))
            return 0
    except TmdError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    if path.is_dir():
        lines = inspect_folder(path, args.rows)
    else:
        lines = [f"{path}  {human(path.stat().st_size)}"] + (peek(path, args.rows) or ["(no peek for this type)"])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
