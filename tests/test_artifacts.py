"""The artifact store: fingerprints, staging and resume, atomic commit, references, verify and lineage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tmdcli.artifacts.fingerprint import (
    HashingWriter,
    canonical_json,
    sha256_bytes,
    sha256_file,
    stage_fingerprint,
)
from tmdcli.artifacts.manifest import SCHEMA, Manifest, read_manifest, write_manifest_atomic
from tmdcli.artifacts.store import KINDS, MissingInput, Store
from tmdcli.errors import ArtifactError, IntegrityError, UsageError


def make(store: Store, kind: str = "prompts", *, seed: int = 0, workers: int = 4, inputs=(), name=None,
         files: dict[str, bytes] | None = None, stage: str = "make-prompts"):
    """Run a fake stage: begin, write `files`, commit. `workers` is a non-identity field."""
    config = {"seed": seed, "source": "toy", "num_workers": workers}
    identity = {"seed": seed, "source": "toy"}
    staging = store.begin(kind=kind, stage=stage, stage_version=1, config=config, identity_config=identity,
                          inputs=list(inputs), name=name)
    if staging.complete:
        return staging.artifact
    for rel, data in (files or {"items.txt": f"seed {seed}".encode()}).items():
        staging.write_bytes(rel, data)
    return staging.commit(stats={"num_items": 1}, facts={"teacher": "toy"})


def begin_s(store: Store, s: int):
    """begin() for a prompts artifact whose whole config is {"s": s}."""
    return store.begin(kind="prompts", stage="make-prompts", stage_version=1, config={"s": s}, identity_config={"s": s})


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "home")


# --------------------------------------------------------------------------------------------------------------
# Fingerprints


def test_canonical_json_is_stable_under_key_order_and_tuples():
    a = {"b": 1, "a": {"y": (1, 2.5), "x": "é"}}
    b = {"a": {"x": "é", "y": [1, 2.5]}, "b": 1}
    assert canonical_json(a) == canonical_json(b) == '{"a":{"x":"\\u00e9","y":[1,2.5]},"b":1}'


def test_canonical_json_rejects_nan_and_non_json():
    with pytest.raises(ValueError):
        canonical_json({"lr": float("nan")})
    with pytest.raises(TypeError):
        canonical_json({"s": {1, 2}})


def test_canonical_json_floats_round_trip():
    assert canonical_json(0.1) == "0.1"
    assert json.loads(canonical_json(1e-300)) == 1e-300


def test_fingerprint_stable_under_key_order_and_input_order():
    fp1 = stage_fingerprint("encode-latents", 1, {"a": 1, "b": {"c": 2, "d": 3}}, ["sha256:aa", "sha256:bb"],
                            [{"name": "wan", "revision": "r1"}, {"name": "t5", "revision": "r2"}])
    fp2 = stage_fingerprint("encode-latents", 1, {"b": {"d": 3, "c": 2}, "a": 1}, ["sha256:bb", "sha256:aa"],
                            [{"revision": "r2", "name": "t5"}, {"revision": "r1", "name": "wan"}])
    assert fp1 == fp2
    assert fp1.startswith("sha256:") and len(fp1) == len("sha256:") + 64


def test_fingerprint_changes_with_stage_version_config_inputs_and_models():
    base = dict(stage="s", stage_version=1, config_identity={"a": 1}, input_fingerprints=[], external_models=[])
    fps = {
        stage_fingerprint(**base),
        stage_fingerprint(**{**base, "stage_version": 2}),
        stage_fingerprint(**{**base, "config_identity": {"a": 2}}),
        stage_fingerprint(**{**base, "input_fingerprints": ["sha256:00"]}),
        stage_fingerprint(**{**base, "external_models": [{"name": "m", "revision": "x"}]}),
    }
    assert len(fps) == 5


def test_sha256_file_streams_and_hashing_writer_matches(tmp_path):
    data = bytes(range(256)) * 5000
    path = tmp_path / "f.bin"
    with open(path, "wb") as raw:
        writer = HashingWriter(raw)
        writer.write(data[:1000])
        writer.write(memoryview(data)[1000:])
    assert writer.bytes_written == len(data)
    assert writer.hexdigest() == sha256_bytes(data)
    assert sha256_file(path, chunk=4096) == (sha256_bytes(data), len(data))


# --------------------------------------------------------------------------------------------------------------
# Manifest


def test_manifest_round_trips_and_rejects_unknown_schema(tmp_path):
    manifest = Manifest(kind="prompts", id="prompts-0123456789ab", stage="make-prompts", stage_version=1,
                        fingerprint="sha256:" + "0" * 64, stats={"loss": float("nan")})
    assert manifest.name == manifest.id
    assert manifest.code["version"] and "python" in manifest.env
    path = write_manifest_atomic(tmp_path / "manifest.json", manifest)
    data = json.loads(path.read_text())  # strict JSON: a NaN metric is written as a string
    assert data["schema"] == SCHEMA and data["stats"]["loss"] == "NaN"
    assert read_manifest(tmp_path).id == manifest.id
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind

    data["schema"] = "tmdcli.manifest/99"
    with pytest.raises(ArtifactError) as err:
        Manifest.from_dict(data)
    assert err.value.hint and "version" in err.value.hint
    data["schema"] = SCHEMA
    with pytest.raises(ArtifactError, match="unknown manifest field"):
        Manifest.from_dict({**data, "surprise": 1})


def test_manifest_does_not_import_torch():
    code = "import sys, tmdcli.artifacts.store, tmdcli.artifacts.media as m; " \
           "from tmdcli.artifacts.manifest import collect_env; e = collect_env(); " \
           "assert 'torch' not in sys.modules, 'torch imported'; print(e.get('torch'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------------------------
# Store: identity, staging, commit


def test_id_derives_from_fingerprint_and_non_identity_fields_do_not_change_it(store):
    a = make(store, workers=4)
    b = make(store, workers=16)  # only a non-identity field differs: the same artifact, "up to date"
    assert a.id == b.id and a.id.startswith("prompts-") and len(a.id) == len("prompts-") + 12
    assert a.id == "prompts-" + a.fingerprint.removeprefix("sha256:")[:12]
    assert len(store.list("prompts")) == 1


def test_different_configs_get_different_ids_and_both_survive(store):
    a = make(store, seed=1)
    b = make(store, seed=2)
    assert a.id != b.id
    assert {x.id for x in store.list("prompts")} == {a.id, b.id}
    assert store.verify(a) == [] and store.verify(b) == []


def test_interrupted_write_leaves_no_visible_artifact_and_rerun_resumes(store):
    config = {"seed": 3}
    first = store.begin(kind="videos", stage="synth-videos", stage_version=1, config=config, identity_config=config)
    first.write_bytes("shards/00000.bin", b"shard zero")
    with pytest.raises(RuntimeError):  # a crash in the middle of the second shard
        with first.open_atomic("shards/00001.bin") as f:
            f.write(b"half a sha")
            raise RuntimeError("killed")
    # Nothing visible: no artifact listed, no ref resolves.
    assert store.list() == [] and store.list("videos") == []
    with pytest.raises(ArtifactError):
        store.resolve("latest", kind="videos")
    with pytest.raises(ArtifactError):
        store.resolve(first.id)

    rerun = store.begin(kind="videos", stage="synth-videos", stage_version=1, config=config, identity_config=config)
    assert not rerun.complete and rerun.path == first.path and rerun.id == first.id
    assert rerun.path.name == f".staging-{rerun.id}"
    assert rerun.has("shards/00000.bin") and not rerun.has("shards/00001.bin")
    rerun.write_bytes("shards/00001.bin", b"shard one")
    artifact = rerun.commit()
    assert [f["path"] for f in artifact.manifest.files] == ["shards/00000.bin", "shards/00001.bin"]
    assert not first.path.exists()  # the staging folder became the artifact


def test_commit_writes_manifest_last_listing_each_file_with_hash_and_size(store, tmp_path):
    staging = store.begin(kind="latents", stage="encode-latents", stage_version=2, config={"a": 1, "w": 8},
                          identity_config={"a": 1}, external_models=[{"name": "wan", "revision": "abc"}])
    payloads = {"shards/00000.safetensors": b"x" * 1000, "text/neg.bin": b"neg", "index.json": b"{}"}
    for rel, data in payloads.items():
        staging.write_bytes(rel, data)
    with staging.atomic_path("shards/00001.safetensors") as tmp:
        assert tmp.suffix == ".safetensors"  # extension kept for writers that sniff it
        tmp.write_bytes(b"written by path")
    payloads["shards/00001.safetensors"] = b"written by path"
    (staging.path / "shards" / "00002.bin.tmp-999").write_bytes(b"leftover of a killed rank")
    assert not (staging.path / "manifest.json").exists()

    artifact = staging.commit(stats={"num_items": 4}, facts={"teacher": "toy"}, duration_s=1.5)
    manifest = read_manifest(artifact.path)
    assert artifact.path == store.home / "latents" / artifact.id
    assert {f["path"]: (f["bytes"], f["sha256"]) for f in manifest.files} == {
        rel: (len(data), sha256_bytes(data)) for rel, data in payloads.items()
    }
    assert manifest.stats == {"num_items": 4} and manifest.facts == {"teacher": "toy"}
    assert manifest.config == {"a": 1, "w": 8} and manifest.stage_version == 2 and manifest.duration_s == 1.5
    assert manifest.external_models == [{"name": "wan", "revision": "abc"}]
    assert manifest.status == "complete" and manifest.created_at.endswith("+00:00")
    # Store bookkeeping and leftovers are gone; the manifest is the newest file.
    names = sorted(p.relative_to(artifact.path).as_posix() for p in artifact.path.rglob("*") if p.is_file())
    assert names == sorted([*payloads, "manifest.json"])
    newest = max(artifact.path.rglob("*"), key=lambda p: p.stat().st_mtime_ns if p.is_file() else 0)
    assert newest.name == "manifest.json"
    assert store.verify(artifact) == []


def test_staging_refuses_reserved_and_escaping_paths(store):
    staging = store.begin(kind="prompts", stage="make-prompts", stage_version=1, config={}, identity_config={})
    for bad in ("manifest.json", ".staging.json", ".hashes/x", "../evil", "/abs", "a.tmp-12"):
        with pytest.raises(ArtifactError):
            staging.write_bytes(bad, b"")


def test_commit_never_overwrites_an_existing_artifact(store):
    first = begin_s(store, 1)
    second = begin_s(store, 1)
    first.write_bytes("a.txt", b"first")
    committed = first.commit()
    before = (committed.path / "manifest.json").read_bytes()
    # Another process committing the same fingerprint gets the existing artifact; nothing is rewritten.
    assert second.commit().id == committed.id
    assert (committed.path / "manifest.json").read_bytes() == before
    # A rerun finds it complete and cannot write into it.
    again = begin_s(store, 1)
    assert again.complete and again.artifact.id == committed.id
    with pytest.raises(ArtifactError):
        again.write_bytes("a.txt", b"overwrite")
    assert (committed.path / "a.txt").read_bytes() == b"first"


def test_commit_refuses_a_final_folder_with_another_fingerprint(store):
    staging = begin_s(store, 5)
    staging.write_bytes("a.txt", b"new")
    # Something else sits where the artifact would go (a hand-made copy, a hash-prefix collision).
    impostor = Manifest(kind="prompts", id=staging.id, stage="make-prompts", stage_version=1,
                        fingerprint="sha256:" + "f" * 64)
    staging.final_path.mkdir(parents=True)
    (staging.final_path / "a.txt").write_bytes(b"old")
    write_manifest_atomic(staging.final_path / "manifest.json", impostor)
    with pytest.raises(ArtifactError, match="never overwritten"):
        staging.commit()
    assert (staging.final_path / "a.txt").read_bytes() == b"old"
    assert staging.path.is_dir()  # the staging folder is kept


def test_name_reuse_by_a_different_config_raises(store):
    a = make(store, seed=1, name="baseline")
    assert a.name == "baseline"
    assert make(store, seed=1, name="baseline").id == a.id  # same config, same name: up to date
    with pytest.raises(ArtifactError, match="already used") as err:
        make(store, seed=2, name="baseline")
    assert "--name" in err.value.hint
    with pytest.raises(ArtifactError):
        make(store, seed=3, name="bad:name")
    # Names are unique per kind only.
    assert make(store, "videos", seed=1, name="baseline", stage="synth-videos").kind == "videos"


def test_resumed_run_keeps_the_name_given_first(store):
    config = {"seed": 9}
    staging = store.begin(kind="prompts", stage="make-prompts", stage_version=1, config=config,
                          identity_config=config, name="mine")
    staging.write_bytes("a.txt", b"a")
    rerun = store.begin(kind="prompts", stage="make-prompts", stage_version=1, config=config, identity_config=config)
    assert rerun.commit().name == "mine"


# --------------------------------------------------------------------------------------------------------------
# References


def test_refs_resolve_by_id_name_latest_kind_latest_and_path(store):
    old = make(store, seed=1, name="first")
    new = make(store, seed=2)
    videos = make(store, "videos", seed=1, inputs=[("prompts", new)], stage="synth-videos")

    assert store.resolve(old.id).id == old.id
    assert store.resolve(old.id, kind="prompts").id == old.id
    assert store.resolve("first").id == old.id
    assert store.resolve("prompts:first").id == old.id
    assert store.resolve("latest", kind="prompts").id == new.id
    assert store.resolve("prompts:latest").id == new.id
    assert store.resolve("latest").id == videos.id  # newest of any kind
    assert store.resolve(str(old.path)).id == old.id
    assert store.resolve(old.path / "manifest.json").id == old.id
    assert [a.id for a in store.list("prompts")] == [new.id, old.id]
    assert [a.id for a in store.list()] == [videos.id, new.id, old.id]


def test_ref_of_the_wrong_kind_is_refused(store):
    prompts = make(store, seed=1, name="p")
    make(store, "videos", seed=1, stage="synth-videos")
    with pytest.raises(ArtifactError, match="prompts"):
        store.resolve(str(prompts.path), kind="videos")
    with pytest.raises(ArtifactError, match="prompts"):
        store.resolve(prompts.id, kind="videos")
    with pytest.raises(ArtifactError):
        store.resolve("prompts:latest", kind="videos")


def test_unknown_ref_raises_artifact_error_with_a_hint(store):
    with pytest.raises(ArtifactError) as err:
        store.resolve("latest", kind="latents")
    assert "tmd encode-latents" in err.value.hint
    assert isinstance(err.value, UsageError) and err.value.exit_code == 2

    made = [make(store, seed=i) for i in range(7)]
    with pytest.raises(ArtifactError, match="nope") as err:
        store.resolve("nope", kind="prompts")
    listed = [a.id for a in made if a.id in err.value.hint]
    assert len(listed) == 5 and "2 more" in err.value.hint
    with pytest.raises(ArtifactError):
        store.resolve("samples:nope")
    with pytest.raises(ArtifactError):
        store.resolve("unknown-kind:latest", kind="nokind")


def test_same_name_in_two_kinds_is_ambiguous_without_a_kind(store):
    make(store, seed=1, name="shared")
    make(store, "videos", seed=1, name="shared", stage="synth-videos")
    with pytest.raises(ArtifactError, match="several kinds") as err:
        store.resolve("shared")
    assert "videos:shared" in err.value.hint
    assert store.resolve("shared", kind="videos").kind == "videos"


def test_folders_without_manifest_are_ignored(store):
    make(store, seed=1)
    (store.home / "prompts" / "prompts-half00written").mkdir()
    (store.home / "prompts" / "prompts-half00written" / "items.txt").write_text("x")
    assert len(store.list("prompts")) == 1
    with pytest.raises(ArtifactError, match="not a complete artifact"):
        store.resolve(str(store.home / "prompts" / "prompts-half00written"))


def test_kinds_constant():
    assert KINDS == ("prompts", "videos", "latents", "student", "eval", "samples")


# --------------------------------------------------------------------------------------------------------------
# Verify and lineage


def test_verify_catches_a_changed_byte_a_missing_file_and_an_extra_file(store):
    artifact = make(store, files={"a.bin": b"0123456789", "sub/b.bin": b"bbbb", "c.bin": b"cc"})
    assert store.verify(artifact) == []
    store.check(artifact)

    data = bytearray((artifact.path / "a.bin").read_bytes())
    data[3] ^= 0x01
    (artifact.path / "a.bin").write_bytes(bytes(data))
    (artifact.path / "sub" / "b.bin").unlink()
    (artifact.path / "c.bin").write_bytes(b"longer")
    (artifact.path / "stray.txt").write_text("?")
    problems = store.verify(artifact)
    assert problems == [
        "sha256 mismatch: a.bin",
        "size mismatch: c.bin (manifest 2 bytes, found 6)",
        "missing file: sub/b.bin",
        "unexpected file: stray.txt",
    ]
    with pytest.raises(IntegrityError) as err:
        store.check(artifact)
    assert err.value.exit_code == 1 and "a.bin" in err.value.message


def test_lineage_walks_inputs_back_and_reports_missing_ones(store):
    prompts = make(store, seed=1)
    videos = make(store, "videos", seed=1, inputs=[("prompts", prompts)], stage="synth-videos")
    latents = make(store, "latents", seed=1, inputs=[("videos", videos)], stage="encode-latents")
    student = make(store, "student", seed=1, inputs=[("latents", latents), ("prompts", prompts)],
                   stage="pretrain-head")
    assert latents.manifest.inputs == [
        {"role": "videos", "kind": "videos", "id": videos.id, "fingerprint": videos.fingerprint}
    ]
    # Depth first, each once: prompts reached through videos is not listed twice.
    assert [a.id for a in store.lineage(student)] == [latents.id, videos.id, prompts.id]

    import shutil

    shutil.rmtree(videos.path)
    chain = store.lineage(student)
    assert [a.id for a in chain] == [latents.id, videos.id, prompts.id]
    assert isinstance(chain[1], MissingInput) and chain[1].missing and chain[1].role == "videos"
    assert not chain[0].missing and not chain[2].missing
