"""`tmd make-prompts --source hf:DATASET[:SPLIT]`: a Hugging Face dataset read offline (a save_to_disk folder or a
snapshot in the local hub cache), the same filters and counts as the CSV path; prompts artifacts opened as a
`datasets.Dataset`; a damaged prompts.parquet named, not a traceback."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tmdcli.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from test_make_prompts import EVAL_COLUMNS, vidprom_csv  # noqa: E402

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
NSFW = EVAL_COLUMNS[3:]


def tmd(*args, home):
    return runner.invoke(app, [str(a) for a in args] + ["--home", str(home)])


def only_artifact(home: Path) -> Path:
    (folder,) = [p for p in (home / "prompts").iterdir() if not p.name.startswith(".")]
    return folder


def csv_columns(path: Path) -> dict:
    """The CSV's rows as columns, NSFW scores as floats (None where empty), as a Hub dataset would type them."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return {c: [(float(r[c]) if r[c] else None) if c in NSFW else r[c] for r in rows] for c in EVAL_COLUMNS}


def outcome(home: Path):
    folder = only_artifact(home)
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = [(r["id"], r["source_key"], r["source_prompt"], r["prompt"], r["seed"])
            for r in pq.read_table(folder / "prompts.parquet").to_pylist()]
    return rows, manifest["stats"], manifest["facts"]["license"]


def test_a_saved_dataset_gives_the_same_prompts_as_the_csv(tmp_path):
    src = vidprom_csv(tmp_path / "VidProM_unique.csv")
    saved = tmp_path / "vidprom-saved"
    datasets.Dataset.from_dict(csv_columns(src)).save_to_disk(str(saved))
    vbench = tmp_path / "all_dimension.txt"
    vbench.write_text("A panda eating bamboo.\n")
    common = ["--expander", "none", "--vbench-prompts", vbench, "--limit", "4"]
    from_csv = tmd("make-prompts", "--source", src, *common, home=tmp_path / "h-csv")
    from_hf = tmd("make-prompts", "--source", f"hf:{saved}", *common, home=tmp_path / "h-hf")
    assert from_csv.exit_code == 0 and from_hf.exit_code == 0, from_csv.output + from_hf.output
    csv_rows, csv_stats, csv_license = outcome(tmp_path / "h-csv")
    hf_rows, hf_stats, hf_license = outcome(tmp_path / "h-hf")
    assert hf_rows == csv_rows and len(hf_rows) == 4
    assert hf_stats["dropped"] == csv_stats["dropped"] and hf_stats["dropped"]["nsfw"] == 2  # every filter counted
    assert hf_stats["filters"] == csv_stats["filters"]
    assert hf_license == csv_license == "CC-BY-NC-4.0 (VidProM)"  # uuid + NSFW columns: VidProM's licence
    manifest = json.loads((only_artifact(tmp_path / "h-hf") / "manifest.json").read_text())
    source = next(e for e in manifest["external_models"] if e["role"] == "source")
    assert source["format"] == "hf-saved" and len(source["sha256"]) == 64  # by content, not by path


def test_dataset_dict_splits_and_dry_run(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"prompt": ["a cat surfing a big wave", "a dog on the beach"]}),
        "test": datasets.Dataset.from_dict({"prompt": ["a red car driving at night"]}),
    }).save_to_disk(str(folder))
    result = tmd("make-prompts", "--source", f"hf:{folder}:test", "--expander", "none", home=tmp_path / "h")
    assert result.exit_code == 0, result.output
    assert [r["prompt"] for r in pq.read_table(only_artifact(tmp_path / "h") / "prompts.parquet").to_pylist()] == [
        "a red car driving at night"]
    dry = tmd("make-prompts", "--source", f"hf:{folder}", "--expander", "none", "--dry-run", home=tmp_path / "h2")
    assert dry.exit_code == 0 and f"source: hf:{folder} (save_to_disk folder): 2 rows" in " ".join(
        dry.stderr.split())
    wrong = tmd("make-prompts", "--source", f"hf:{folder}:validation", "--expander", "none", home=tmp_path / "h3")
    assert wrong.exit_code == 2 and "has no split 'validation' (splits: train, test)" in wrong.stderr


def test_a_snapshot_in_the_hub_cache_is_read_offline(tmp_path, monkeypatch):
    """The layout `hf download --repo-type dataset org/name` leaves (refs/main -> snapshots/<commit>/files)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "datasets--org--prompts"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "train.jsonl").write_text(json.dumps({"prompt": "a cat surfing a big wave"}) + "\n"
                                          + json.dumps({"prompt": "a horse on a beach"}) + "\n")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")  # no write to ~/.cache
    result = tmd("make-prompts", "--source", "hf:org/prompts", "--expander", "none", home=tmp_path / "h")
    assert result.exit_code == 0, result.output
    folder = only_artifact(tmp_path / "h")
    assert [r["prompt"] for r in pq.read_table(folder / "prompts.parquet").to_pylist()] == [
        "a cat surfing a big wave", "a horse on a beach"]
    source = next(e for e in json.loads((folder / "manifest.json").read_text())["external_models"]
                  if e["role"] == "source")
    assert source == {"role": "source", "name": "org/prompts", "format": "hf-snapshot", "split": "train",
                      "revision": commit}


def test_a_missing_dataset_exits_2_saying_how_to_get_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    result = tmd("make-prompts", "--source", "hf:WenhaoWang/VidProM", "--expander", "none", home=tmp_path / "h")
    assert result.exit_code == 2
    text = " ".join(result.stderr.split())
    assert "Hugging Face dataset WenhaoWang/VidProM does not exist on this machine" in text
    assert "hf download --repo-type dataset WenhaoWang/VidProM" in text and "save_to_disk" in text
    dry = tmd("make-prompts", "--source", "hf:WenhaoWang/VidProM", "--expander", "none", "--dry-run",
              home=tmp_path / "h")
    assert dry.exit_code == 0 and "source: NOT AVAILABLE: Hugging Face dataset" in " ".join(dry.stderr.split())
    not_saved = tmp_path / "plain-folder"
    not_saved.mkdir()
    plain = tmd("make-prompts", "--source", f"hf:{not_saved}", "--expander", "none", home=tmp_path / "h")
    assert plain.exit_code == 2 and "not a folder written by save_to_disk" in " ".join(plain.stderr.split())


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "data_tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inspect_artifact_opens_prompts_as_a_dataset(tmp_path, capsys):
    home = tmp_path / "h"
    assert tmd("make-prompts", "--source", "toy:3", home=home).exit_code == 0
    folder = only_artifact(home)
    inspect = load_tool("inspect_artifact")
    dataset = inspect.open_prompts_dataset(folder)
    assert isinstance(dataset, datasets.Dataset) and dataset.num_rows == 3
    assert dataset["prompt"] == pq.read_table(folder / "prompts.parquet").column("prompt").to_pylist()
    assert dataset.features["id"].dtype == "int64"
    assert inspect.main(["prompts:latest", "--home", str(home), "--as-dataset", "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "datasets.Dataset: 3 rows" in out and "row 0:" in out and "row 1:" not in out
    assert inspect.main([str(tmp_path), "--as-dataset"]) == 2  # not a prompts artifact
    assert "has no prompts.parquet" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# A damaged prompts.parquet (issue 15, section 3)


@pytest.mark.parametrize("stage", [["synth-videos", "--teacher", "tiny-random", "--dry-run"],
                                   ["eval", "--model", "tiny-random", "--prompts", "prompts:latest", "--dry-run"]])
def test_a_truncated_prompts_parquet_is_named_with_its_artifact(tmp_path, stage):
    home = tmp_path / "h"
    assert tmd("make-prompts", "--source", "toy:4", home=home).exit_code == 0
    path = only_artifact(home) / "prompts.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = tmd(*stage, home=home)
    text = " ".join(result.stderr.split())
    assert result.exit_code == 1, result.output
    assert f"{path} of prompts artifact {path.parent.name} is damaged" in text
    assert "this is a bug" not in text and "ArrowInvalid" not in text
    assert f"delete {path.parent} and rerun the `tmd make-prompts` that made it" in text


def test_read_prompt_items_names_a_damaged_file(tmp_path):
    """The reader synth-videos' workers use (past the plan's footer check): a file whose body is damaged."""
    from tmdcli.artifacts.store import Store
    from tmdcli.errors import IntegrityError
    from tmdcli.stages.synth_videos import read_prompt_items

    home = tmp_path / "h"
    assert tmd("make-prompts", "--source", "toy:4", home=home).exit_code == 0
    path = only_artifact(home) / "prompts.parquet"
    data = bytearray(path.read_bytes())
    data[4:40] = b"\xff" * 36  # the first column chunk, behind an intact footer
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as caught:
        read_prompt_items(Store(home).resolve("prompts:latest"), None, None)
    assert str(path) in caught.value.message and caught.value.exit_code == 1
