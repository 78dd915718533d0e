"""Inputs are checked when a stage starts (DESIGN.md 3; issue 15): a damaged file is refused with exit 1 naming it,
--no-verify-inputs skips the sha256, and each file is hashed once (cached by path, size and mtime)."""

import json
import struct

import pytest
from typer.testing import CliRunner

from tmdcli.artifacts import verify_inputs as checks
from tmdcli.artifacts.store import Store
from tmdcli.cli import app
from tmdcli.errors import IntegrityError

from conftest import write_tiny_latents

SHARD = "shards/latents-00000.safetensors"
WEIGHTS = "export/transformer/diffusion_pytorch_model.safetensors"
PRETRAIN = ["pretrain-head", "--teacher", "tiny-random", "--n", "2", "--h", "1", "--batch", "2", "--iters", "1",
            "--num-sample-prompts", "0"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def flip_16_bits(path, tensor=None):
    """Flip the lowest mantissa bit of 16 float32 values of a safetensors file (`tensor`, or its largest): the
    size stays, the values stay finite, only the bytes differ from what the manifest vouches for."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = tensor or max((k for k in header if k != "__metadata__"),
                         key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    assert header[name]["dtype"] == "F32"
    start = 8 + n + header[name]["data_offsets"][0]
    for j in range(16):
        data[start + 4 * j] ^= 1  # little endian: byte 0 holds the lowest mantissa bits
    path.write_bytes(bytes(data))
    return bytes(data)


def count_hashes(monkeypatch):
    calls = []
    real = checks.plain_sha256
    monkeypatch.setattr(checks, "plain_sha256", lambda path: calls.append(path.name) or real(path))
    return calls


def test_each_input_file_is_hashed_once_then_read_from_the_cache(home, monkeypatch):
    latents = write_tiny_latents(home)
    calls = count_hashes(monkeypatch)
    checks.verify_inputs(home, [("latents", latents)])
    assert sorted(calls) == ["latents-00000.safetensors", "negative.safetensors"]
    cache = json.loads((home / ".cache" / "hashes.json").read_text())
    entry = cache[str(latents.file(SHARD))]
    assert entry["sha256"] == {f["path"]: f["sha256"] for f in latents.manifest.files}[SHARD]
    checks.verify_inputs(home, [("latents", latents)])  # the next stage start: nothing is read again
    assert len(calls) == 2
    flip_16_bits(latents.file(SHARD), "latents")  # a write changes the mtime: hashed again, and caught
    with pytest.raises(IntegrityError, match="sha256 mismatch: " + SHARD):
        checks.verify_inputs(home, [("latents", latents)])
    assert calls[2:] == ["latents-00000.safetensors"]


def test_a_committed_artifact_is_remembered_so_the_next_stage_hashes_nothing(home, monkeypatch):
    latents = write_tiny_latents(home)
    checks.remember_committed(home, latents)
    calls = count_hashes(monkeypatch)
    checks.verify_inputs(home, [("latents", latents)])
    assert calls == []


@pytest.mark.slow  # one pretrain-head run and two samples on tiny-random: ~12 s CPU
def test_damaged_latents_and_student_weights_are_refused_naming_the_file(home, tmp_path):
    latents = write_tiny_latents(home)
    original = latents.file(SHARD).read_bytes()
    flip_16_bits(latents.file(SHARD), "latents")
    refused = invoke(*PRETRAIN, "--home", home)
    assert refused.exit_code == 1, refused.output
    assert f"sha256 mismatch: {SHARD}" in refused.stderr and latents.id in refused.stderr
    assert "tmd encode-latents" in refused.stderr and "Traceback" not in refused.output
    assert not (home / "student").exists()  # nothing trained, nothing staged, nothing committed
    # those who know: --no-verify-inputs trains on it (sizes are still checked)
    trained = invoke(*PRETRAIN, "--no-verify-inputs", "--home", home)
    assert trained.exit_code == 0, trained.output
    student = Store(home).resolve("student:latest")
    latents.file(SHARD).write_bytes(original)  # the latents are whole again; now damage the student's weights
    flip_16_bits(student.file(WEIGHTS))
    out = tmp_path / "clip.mp4"
    sample = invoke("sample", "a cat surfing", "--model", student.id, "--out", out, "--home", home)
    assert sample.exit_code == 1 and f"sha256 mismatch: {WEIGHTS}" in sample.stderr, sample.output
    assert "tmd pretrain-head" in sample.stderr and not out.exists()
    distill = invoke("distill", "--teacher", "tiny-random", "--n", "2", "--h", "1", "--batch", "2", "--iters", "1",
                     "--init", student.id, "--home", home)
    assert distill.exit_code == 1 and f"sha256 mismatch: {WEIGHTS}" in distill.stderr, distill.output
    assert [s.id for s in Store(home).list("student")] == [student.id]
    sampled = invoke("sample", "a cat surfing", "--model", student.id, "--out", out, "--no-verify-inputs",
                     "--home", home)
    assert sampled.exit_code == 0 and out.is_file(), sampled.output
