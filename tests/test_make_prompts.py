"""`tmd make-prompts`: sources and filter counts, the toy expander, the real transformers generation path on a tiny
random Qwen2-style chat model (WAN.md 6.4), kill-and-resume, bad inputs, and the data_tools scripts."""

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tmdcli.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
EVAL_COLUMNS = ["uuid", "prompt", "time", "toxicity", "obscene", "identity_attack", "insult", "threat",
                "sexual_explicit"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def tmd(*args, home=None):
    argv = [str(a) for a in args] + (["--home", str(home)] if home is not None else [])
    return runner.invoke(app, argv)


def committed(home) -> Path:
    folders = [p for p in (Path(home) / "prompts").iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1, folders
    return folders[0]


def rows_of(folder: Path) -> list[dict]:
    return pq.read_table(folder / "prompts.parquet").to_pylist()


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def write_lines(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------
# A tiny random Qwen2-style chat model, built in code and saved (WAN.md 6.4)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    from tmdcli.data.expanders import SYSTEM_PROMPT

    # The system prompt is in the corpus so that it tokenizes compactly (a few hundred tokens, not bytes).
    corpus = ["a red circle moving left on a gray background", "a cat surfing a big wave at sunset, cinematic",
              SYSTEM_PROMPT] * 20
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    vocab = {k: v for k, v in bpe.get_vocab().items() if k not in specials}
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=eos, pad_token_id=tok.pad_token_id)).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-qwen") / "tiny-qwen2-chat"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def one_thread():
    """Generation with a tiny model is dominated by thread synchronisation on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------------
# Sources and filters


def test_text_source_then_ls_and_verify_pass(tmp_path, home):
    """Acceptance: `tmd make-prompts --source prompts.txt --expander none`, then `tmd ls` and `tmd verify latest`."""
    lines = ["a cat surfing a big wave at sunset", "", "a dog running along the beach",
             "a cat surfing a big wave at sunset!"]
    src = write_lines(tmp_path / "prompts.txt", lines)
    result = tmd("make-prompts", "--source", src, "--expander", "none", home=home)
    assert result.exit_code == 0, result.output
    folder = committed(home)
    assert result.stdout.strip() == str(folder)  # stdout holds only the result
    rows = rows_of(folder)
    assert [r["prompt"] for r in rows] == ["a cat surfing a big wave at sunset", "a dog running along the beach"]
    assert [r["id"] for r in rows] == [0, 1] and [r["seed"] for r in rows] == [0, 1]
    assert {r["expander"] for r in rows} == {"none"} and {r["status"] for r in rows} == {"unchanged"}
    assert [r["source_key"] for r in rows] == ["1", "3"]  # line numbers
    schema = pq.read_schema(folder / "prompts.parquet")
    assert schema.names[:6] == ["id", "source_prompt", "prompt", "expander", "seed", "spec"]
    assert str(schema.field("id").type) == "int64" and str(schema.field("seed").type) == "int64"
    stats = manifest_of(folder)["stats"]
    assert stats["dropped"]["empty"] == 1 and stats["dropped"]["duplicate"] == 1 and stats["num_prompts"] == 2
    listed = tmd("ls", home=home)
    assert listed.exit_code == 0 and folder.name in listed.stdout
    verified = tmd("verify", "latest", home=home)
    assert verified.exit_code == 0 and verified.stdout.strip() == folder.name
    again = tmd("make-prompts", "--source", src, "--expander", "none", home=home)  # same config: up to date
    assert again.exit_code == 0 and again.stdout.strip() == str(folder)


def vidprom_csv(path: Path) -> Path:
    zero = ["0.001"] * 6
    long_text = " ".join(["word"] * 130)
    rows = [
        ["u01", "a cat surfing a big wave at sunset", "Sun Sep  3 12:27:44 2023", *zero],
        ["u02", "an unsafe prompt with high toxicity", "Sun Sep  3 12:28:00 2023", "0.5", *zero[1:]],
        ["u03", "", "Sun Sep  3 12:29:00 2023", *zero],
        ["u04", "hi there", "Sun Sep  3 12:30:00 2023", *zero],
        ["u05", long_text, "Sun Sep  3 12:31:00 2023", *zero],
        ["u06", "A cat surfing a big wave, at sunset!", "Sun Sep  3 12:32:00 2023", *zero],
        ["u07", "a horse galloping along the beach -ar 16:9 -motion 2 -neg blurry, low quality",
         "Mon Sep  4 01:00:00 2023", *zero],
        ["u08", "\u4e00\u53ea\u732b\u5728\u6d77\u6d6a\u4e0a\u51b2\u6d6a \u4e00\u53ea\u732b \u51b2\u6d6a",
         "Mon Sep  4 01:01:00 2023", *zero],
        ["u09", "a dog &amp; a cat playing in the snow", "Mon Sep  4 01:02:00 2023", *zero],
        ["u10", "a panda eating bamboo", "Mon Sep  4 01:03:00 2023", *zero],
        ["u11", "a red car driving through a city at night https://example.com/x.png", "Mon Sep  4 01:04:00 2023",
         *zero],
        ["u12", "a prompt that scores high on one column", "Mon Sep  4 01:05:00 2023", *zero[:5], "0.2"],
        ["u13", "a bird flying over snowy mountains", "Mon Sep  4 01:06:00 2023", "", "", "", "", "", ""],
    ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(EVAL_COLUMNS)
        writer.writerows(rows)
    return path


def test_vidprom_csv_filters_are_counted_and_cleaned(tmp_path, home):
    src = vidprom_csv(tmp_path / "VidProM_unique.csv")
    vbench = write_lines(tmp_path / "all_dimension.txt", ["A panda eating bamboo.", "a person swimming"])
    result = tmd("make-prompts", "--source", src, "--expander", "none", "--vbench-prompts", vbench, home=home)
    assert result.exit_code == 0, result.output
    folder = committed(home)
    rows = rows_of(folder)
    assert [r["source_key"] for r in rows] == ["u01", "u07", "u09", "u11", "u13"]
    assert [r["prompt"] for r in rows] == ["a cat surfing a big wave at sunset", "a horse galloping along the beach",
                                           "a dog & a cat playing in the snow",
                                           "a red car driving through a city at night",
                                           "a bird flying over snowy mountains"]
    manifest = manifest_of(folder)
    stats = manifest["stats"]
    assert stats["num_source_rows"] == 13 and stats["num_prompts"] == 5
    assert stats["dropped"] == {"nsfw": 2, "empty": 1, "not_english": 1, "too_short": 1, "too_long": 1,
                                "duplicate": 1, "vbench": 1}
    steps = stats["filters"]
    assert steps[0]["in"] == 13 and steps[-1]["out"] == 5
    assert all(a["out"] == b["in"] for a, b in zip(steps, steps[1:]))
    assert manifest["facts"]["license"] == "CC-BY-NC-4.0 (VidProM)"
    assert {e["role"] for e in manifest["external_models"]} == {"source", "expander", "vbench-prompts"}

    # --limit applies after filtering: a seeded subset of the survivors, in source order; thresholds are flags.
    limited = tmd("make-prompts", "--source", src, "--expander", "none", "--vbench-prompts", vbench, "--limit", "3",
                  "--nsfw-threshold", "1", "--max-words", "0", "--set", "blocklist=Horse,zebra", home=tmp_path / "h2")
    assert limited.exit_code == 0, limited.output
    folder2 = committed(tmp_path / "h2")
    stats2 = manifest_of(folder2)["stats"]["dropped"]
    assert stats2["nsfw"] == 0 and "too_long" not in stats2 and stats2["blocklist"] == 1 and stats2["limit"] == 4
    keys = [r["source_key"] for r in rows_of(folder2)]
    assert len(keys) == 3 and keys == sorted(keys) and [r["id"] for r in rows_of(folder2)] == [0, 1, 2]
    assert "u07" not in keys


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_sources(tmp_path, home, fmt):
    prompts = ["a cat surfing a big wave", "a dog running on the beach", "", "a cat surfing a big wave"]
    if fmt == "jsonl":
        src = tmp_path / "p.jsonl"
        src.write_text("\n".join(json.dumps({"uuid": f"k{i}", "prompt": p, "other": 1}) for i, p in
                                 enumerate(prompts)) + "\n")
    else:
        src = tmp_path / "p.parquet"
        pq.write_table(pa.table({"uuid": [f"k{i}" for i in range(4)], "prompt": prompts, "other": [1] * 4}), src)
    result = tmd("make-prompts", "--source", src, "--expander", "none", home=home)
    assert result.exit_code == 0, result.output
    folder = committed(home)
    assert [(r["source_key"], r["prompt"]) for r in rows_of(folder)] == [("k0", prompts[0]), ("k1", prompts[1])]
    assert manifest_of(folder)["stats"]["dropped"] == {"empty": 1, "not_english": 0, "too_short": 0,
                                                       "too_long": 0, "duplicate": 1}


def test_toy_source_is_deterministic_with_specs_that_parse_back(tmp_path):
    from tmdcli.toy.grammar import Scene, parse_caption, spec_of

    first = tmd("make-prompts", "--source", "toy:40", "--seed", "3", home=tmp_path / "a")
    second = tmd("make-prompts", "--source", "toy:40", "--seed", "3", home=tmp_path / "b")
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    a, b = committed(tmp_path / "a"), committed(tmp_path / "b")
    assert a.name == b.name and rows_of(a) == rows_of(b)
    rows = rows_of(a)
    assert len(rows) == 40 and [r["seed"] for r in rows] == list(range(3, 43))
    assert {r["expander"] for r in rows} == {"toy"} and {r["status"] for r in rows} == {"toy"}
    for row in rows:
        scene = json.loads(row["spec"])
        assert scene["split"] == "train"
        wanted = spec_of(Scene.from_dict(scene))
        assert parse_caption(row["source_prompt"]) == wanted
        assert parse_caption(row["prompt"]) == wanted  # the rewrite asks for the same scene
    assert sum(r["prompt"] != r["source_prompt"] for r in rows) >= 30
    facts = manifest_of(a)["facts"]
    assert facts["expander"] == "toy" and facts["num_items"] == 40

    held = tmd("make-prompts", "--source", "toy-heldout:8", "--expander", "none", home=tmp_path / "c")
    assert held.exit_code == 0, held.output
    held_rows = rows_of(committed(tmp_path / "c"))
    assert len(held_rows) == 8 and all(json.loads(r["spec"])["split"] == "heldout" for r in held_rows)
    assert all(r["prompt"] == r["source_prompt"] for r in held_rows)


# --------------------------------------------------------------------------------------------------------------
# Language-model expansion through the real transformers path


def test_validation_cleans_and_rejects():
    from tmdcli.data.expanders import SYSTEM_PROMPT, GenerationSettings, validate_output

    s = GenerationSettings(min_words=5, max_words=20)
    assert validate_output("", s) == ("", "empty")
    assert validate_output("\n\n  \n", s)[1] == "empty"
    assert validate_output('Rewritten prompt: "a cat surfs a huge wave at golden hour"', s) == (
        "a cat surfs a huge wave at golden hour", None)
    assert validate_output("\u4e00\u53ea\u732b a cat surfs a wave today", s)[1] == "not_english"
    assert validate_output("I'm sorry, but I cannot help with that request.", s)[1] == "refusal"
    assert validate_output(SYSTEM_PROMPT.split("\n")[0], s)[1] == "echo"
    assert validate_output("a cat", s)[1] == "too_short"
    assert validate_output(" ".join(["cat"] * 21), s)[1] == "too_long"


def test_transformers_expander_batches_left_padded_and_deterministic(tiny_qwen, one_thread):
    from tmdcli.data.expanders import SYSTEM_PROMPT, GenerationSettings, TransformersExpander

    greedy = GenerationSettings(max_new_tokens=6, batch_size=2, do_sample=False, min_words=0)
    expander = TransformersExpander(tiny_qwen, greedy, device="cpu", dtype="float32")
    assert expander.tokenizer.padding_side == "left"
    chat = expander.chat_texts(["a cat surfing"])[0]
    assert SYSTEM_PROMPT in chat and "a cat surfing" in chat and chat.endswith("assistant\n")
    prompts = ["a cat surfing", "a much longer prompt about a dog running on a beach at dawn", "a red car"]
    out1 = expander.expand(prompts, [0, 1, 2])
    assert expander.num_generate_calls == 2  # 3 prompts in batches of 2, no retries when greedy
    out2 = expander.expand(prompts, [0, 1, 2])
    assert out1 == out2 and len(out1) == 3
    for prompt, result in zip(prompts, out1):
        assert isinstance(result.text, str)
        assert result.status == "expanded" or (result.status.startswith("fallback:") and result.text == prompt)

    sampled = TransformersExpander(tiny_qwen, GenerationSettings(max_new_tokens=6, batch_size=2, max_retries=1),
                                   device="cpu", dtype="float32")
    raw_a = sampled._generate(prompts, [5, 6, 7])
    raw_b = sampled._generate(prompts, [5, 6, 7])
    assert raw_a == raw_b and len(raw_a) == 3  # seeded per batch


def test_qwen_expander_path_runs_and_counts_fallbacks(tmp_path, home, tiny_qwen, one_thread):
    from tmdcli.data.expanders import SYSTEM_PROMPT_SHA256

    src = write_lines(tmp_path / "p.txt", [f"a cat number {i} surfing a big wave" for i in range(7)])
    args = ["make-prompts", "--source", src, "--expander", tiny_qwen, "--max-new-tokens", "8", "--batch-size", "3",
            "--set", "chunk_size=4", "--set", "max_retries=0", "--device", "cpu"]
    dry = tmd(*args, "--dry-run", home=home)
    assert dry.exit_code == 0, dry.output
    assert not home.exists() and "generate calls" in dry.stderr and "chunks: 2" in dry.stderr
    result = tmd(*args, home=home)
    assert result.exit_code == 0, result.output
    folder = committed(home)
    rows = rows_of(folder)
    assert [r["id"] for r in rows] == list(range(7)) and {r["expander"] for r in rows} == {tiny_qwen.name}
    for row in rows:  # a random model writes garbage: check the bookkeeping, never the content
        assert row["status"] == "expanded" or row["status"].startswith("fallback:")
        if row["status"].startswith("fallback:"):
            assert row["prompt"] == row["source_prompt"]
    manifest = manifest_of(folder)
    stats, facts = manifest["stats"], manifest["facts"]
    assert sum(stats["status_counts"].values()) == 7
    assert stats["num_fallback"] + stats["num_rewritten"] == 7 and stats["num_fallback"] >= 1
    assert sum(stats["fallback_reasons"].values()) == stats["num_fallback"]
    assert facts["system_prompt_sha256"] == SYSTEM_PROMPT_SHA256 and facts["sampling"]["max_new_tokens"] == 8
    assert facts["compute"] == {"device": "cpu", "dtype": "float32"}  # --dtype auto on the CPU
    expander_entry = next(e for e in manifest["external_models"] if e["role"] == "expander")
    assert len(expander_entry["sha256"]) == 64 and expander_entry["backend"] == "transformers"
    chunks = sorted((folder / "chunks").iterdir())
    assert [c.name for c in chunks] == ["chunk-00000.parquet", "chunk-00001.parquet"]
    assert pa.concat_tables([pq.read_table(c) for c in chunks]).to_pylist() == rows


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_qwen, one_thread):
    src = write_lines(tmp_path / "p.txt", [f"prompt {i}: a cat surfing a wave at sunset" for i in range(24)])
    args = ["make-prompts", "--source", str(src), "--expander", str(tiny_qwen), "--max-new-tokens", "8",
            "--batch-size", "2", "--set", "chunk_size=2", "--set", "max_retries=0", "--device", "cpu"]
    home = tmp_path / "home"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}  # as one_thread sets in this process, so every run computes alike
    proc = subprocess.Popen([sys.executable, "-m", "tmdcli", *args, "--home", str(home)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        first = None
        while first is None and time.monotonic() < deadline and proc.poll() is None:
            found = list((home / "prompts").glob(".staging-*/chunks/chunk-00000.parquet"))
            first = found[0] if found else None
            time.sleep(0.01)
        assert first is not None, proc.communicate()[1].decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    staging = first.parent.parent
    assert not list((home / "prompts").glob("prompts-*"))  # nothing committed
    written = {p.name: p.stat().st_mtime_ns for p in staging.glob("chunks/chunk-*.parquet")}
    assert 1 <= len(written) < 12

    resumed = tmd(*args, home=home)
    assert resumed.exit_code == 0, resumed.output
    assert "already done (resumes)" in resumed.stderr
    folder = committed(home)
    for name, mtime in written.items():  # chunks of the killed run were kept, not redone
        assert (folder / "chunks" / name).stat().st_mtime_ns == mtime
    assert not [p for p in folder.rglob("*") if ".tmp-" in p.name]

    reference = tmd(*args, home=tmp_path / "other")
    assert reference.exit_code == 0, reference.output
    ref_folder = committed(tmp_path / "other")
    assert ref_folder.name == folder.name and rows_of(ref_folder) == rows_of(folder)
    assert len(rows_of(folder)) == 24
    assert tmd("verify", "latest", home=home).exit_code == 0


# --------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_exit_2_with_messages(tmp_path, home, monkeypatch):
    good = write_lines(tmp_path / "ok.txt", ["a cat surfing a big wave"])
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("uuid,prompt,toxicity\nu1,a cat surfing a wave,0.0\nu2,too,many,fields,here\n")
    no_column = tmp_path / "nocol.csv"
    no_column.write_text("uuid,text\nu1,a cat surfing a wave\n")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "a cat surfing a wave"}\n{not json\n')
    jsonl_no_prompt = tmp_path / "nop.jsonl"
    jsonl_no_prompt.write_text('{"text": "a cat surfing a wave"}\n')
    xlsx = tmp_path / "prompts.xlsx"
    xlsx.write_bytes(b"PK\x03\x04")
    cases = [
        (["--source", tmp_path / "missing.csv", "--expander", "none"], "does not exist"),
        (["--source", bad_csv, "--expander", "none"], "malformed CSV"),
        (["--source", no_column, "--expander", "none"], "no 'prompt' column"),
        (["--source", bad_jsonl, "--expander", "none"], "line 2 is not JSON"),
        (["--source", jsonl_no_prompt, "--expander", "none"], "no 'prompt' column"),
        (["--source", good, "--expander", "gpt-17"], "unknown expander"),
        (["--source", good, "--expander", "none", "--set", "nope=1"], "unknown key"),
        (["--source", good, "--expander", "none", "--limit", "0"], "--limit"),
        (["--source", xlsx, "--expander", "none"], "cannot tell the format"),
    ]
    for args, message in cases:
        result = tmd("make-prompts", *args, home=home)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and "Traceback" not in result.output, (args, result.stderr)
    assert not (home / "prompts").exists() or not list((home / "prompts").iterdir())

    if importlib.util.find_spec("vllm") is None:
        result = tmd("make-prompts", "--source", good, "--backend", "vllm", "--expander", "none", home=home)
        assert result.exit_code == 2 and "vllm" in result.stderr

    # A missing model says where it looked and how to get it; the default expander for a file is qwen2.5-7b.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for extra in (["--expander", "qwen2.5-7b"], []):
        result = tmd("make-prompts", "--source", good, *extra, home=home)
        assert result.exit_code == 2, result.output
        assert "hf download Qwen/Qwen2.5-7B-Instruct" in result.stderr and "empty-cache" in result.stderr
        # a dry run (a recipe's DRY_RUN before the weights are fetched) shows the same message in the plan
        result = tmd("make-prompts", "--source", good, *extra, "--dry-run", home=home)
        assert result.exit_code == 0, result.output
        text = " ".join(result.stderr.split())
        assert "expander: NOT AVAILABLE" in text and "hf download Qwen/Qwen2.5-7B-Instruct" in text


# --------------------------------------------------------------------------------------------------------------
# data_tools


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"data_tools_{name}", REPO / "data_tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_prompts_and_inspect_artifact(tmp_path, home, capsys):
    long_prompt = " ".join(["a very detailed expanded prompt about a cat surfing"] * 20)  # 180 words: kept
    src = write_lines(tmp_path / "vidprom_filtered_extended.txt", [long_prompt, "short one", "", long_prompt])
    assert load_tool("import_prompts").main([str(src), "--home", str(home), "--name", "sf-list"]) == 0
    folder = committed(home)
    assert capsys.readouterr().out.strip() == str(folder)
    rows = rows_of(folder)
    assert [r["prompt"] for r in rows] == [long_prompt, "short one"]
    assert {r["expander"] for r in rows} == {"imported"} and {r["status"] for r in rows} == {"imported"}
    facts = manifest_of(folder)["facts"]
    assert facts["provenance"] == f"imported from {src.name}" and facts["license"] == "CC-BY-NC-4.0 (VidProM)"
    assert manifest_of(folder)["name"] == "sf-list"

    inspect = load_tool("inspect_artifact")
    assert inspect.main(["prompts:sf-list", "--home", str(home), "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert folder.name in out and "prompts.parquet" in out and "status counts: imported=2" in out
    assert "stats.num_prompts: 2" in out

    # Shards of other stages, generically: a safetensors shard (header only) and a tar shard (members).
    import io

    import numpy as np
    from safetensors.numpy import save, save_file

    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({"latents": np.zeros((2, 16, 3, 4, 4), np.float32), "ids": np.arange(2)},
              str(shards / "00000.safetensors"), metadata={"kind": "latents"})
    members = {"index.json": json.dumps({"shard": 0, "items": [{"id": 0, "file": "0.mp4"}, {"id": 1, "file": "1.mp4"}]}
                                        ).encode(),
               "0.mp4": b"x" * 10, "1.mp4": b"x" * 10,
               "tensors.safetensors": save({"latent.0": np.zeros((16, 3, 4, 4), np.float32)})}
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert inspect.main([str(shards)]) == 0
    out = capsys.readouterr().out
    assert "no manifest" in out and "latents: F32 [2, 16, 3, 4, 4]" in out and "ids: I64 [2]" in out
    assert "tar: 4 members" in out and "index.json: shard=0, items=[2 entries]" in out
    assert "latent.0: F32 [16, 3, 4, 4]" in out and '"file": "1.mp4"' in out
    assert inspect.main([str(shards / "00000.safetensors")]) == 0
    assert "safetensors: 2 tensors" in capsys.readouterr().out
    assert inspect.main(["prompts:nope", "--home", str(home)]) == 2


def test_vllm_backend_plumbing_against_a_stand_in_module(monkeypatch, tmp_path):
    """vllm cannot be installed on these machines (CUDA-only wheels; absent on the GPU image too). This checks our
    side of its documented offline API (LLM(...).chat(messages, sampling_params=[...]) with per-request seeds)
    against a stand-in module; it is not a test of vllm itself."""
    import sys
    import types

    from tmdcli.data import expanders

    calls = {}

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def chat(self, conversations, sampling_params, use_tqdm):
            calls["chat"] = (conversations, sampling_params)
            text = " ".join(["a cinematic shot of a cat riding a wave at golden hour"] * 4)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=text)]) for _ in conversations]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    expander = expanders.VllmExpander(tmp_path, expanders.GenerationSettings(), dtype="bfloat16", seed=3)
    results = expander.expand(["a cat surfing", "a dog"], [11, 12])
    assert calls["init"]["trust_remote_code"] is False and calls["init"]["dtype"] == "bfloat16"
    conversations, params = calls["chat"]
    assert [c[0]["role"] for c in conversations] == ["system", "system"]
    assert [c[1]["content"] for c in conversations] == ["a cat surfing", "a dog"]
    assert [p.kwargs["seed"] for p in params] == [expanders.derived_seed(11, 0), expanders.derived_seed(12, 0)]
    assert [r.status for r in results] == ["expanded", "expanded"]
