"""LoRA mode of `tmd distill` (models/lora.py) on the tiny-random teacher: the merge is exact, only adapters (and the
flow-head modules) train, a stopped run resumes to the same weights, the export is a plain student, and a missing
PEFT exits 2 naming the extra. (Two ranks under FSDP2: tests/test_multirank.py.)"""

import copy

import pytest
import torch
from typer.testing import CliRunner

from tmdcli.artifacts.store import Store
from tmdcli.cli import app

from conftest import write_tiny_latents

pytest.importorskip("peft")

LORA = ["distill", "--teacher", "tiny-random", "--n", "2", "--h", "1", "--batch", "2", "--iters", "6",
        "--save-every", "3", "--lr", "1e-3", "--num-sample-prompts", "0", "--lora-rank", "4"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_merged_state_gives_the_adapted_transformers_output(fresh_tiny_transformer):
    from tmdcli.models import wan
    from tmdcli.models.lora import DEFAULT_TARGETS, add_lora, has_lora, merge_lora_state

    plain = copy.deepcopy(fresh_tiny_transformer)
    adapted = add_lora(fresh_tiny_transformer, 4, DEFAULT_TARGETS, seed=0)
    with torch.no_grad():  # B starts at zero (exactly the base model); move it so the merge has work to do
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    trained = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    state = adapted.state_dict()
    assert has_lora(state)
    merged = merge_lora_state(state)
    assert not has_lora(merged) and merged.keys() == plain.state_dict().keys()
    plain.load_state_dict(merged)
    g = torch.Generator().manual_seed(0)
    x, text, t = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 32, 32, generator=g), torch.tensor([0.4])
    with torch.no_grad():
        torch.testing.assert_close(wan.velocity(plain, x, t, text), wan.velocity(adapted, x, t, text),
                                   rtol=1e-5, atol=1e-5)


def test_lora_distill_trains_adapters_resumes_and_exports_a_plain_student(tmp_path):
    homes = [tmp_path / "a", tmp_path / "b"]
    write_tiny_latents(homes[0])
    init = invoke("pretrain-head", "--teacher", "tiny-random", "--n", 2, "--h", 1, "--batch", 2, "--iters", 2,
                  "--num-sample-prompts", 0, "--home", homes[0])
    assert init.exit_code == 0, init.output
    import shutil

    shutil.copytree(homes[0], homes[1])
    plan = invoke(*LORA, "--dry-run", "--home", homes[0])
    assert plan.exit_code == 0 and "rank 4 adapters" in plan.output and "critic step" in plan.output, plan.output
    assert invoke(*LORA, "--home", homes[0]).exit_code == 0  # uninterrupted
    first = invoke(*LORA, "--stop-after", 3, "--home", homes[1])
    assert first.exit_code == 0 and "stopped after iteration 3" in first.output, first.output
    second = invoke(*LORA, "--home", homes[1])
    assert second.exit_code == 0 and "resuming from iter-0000003" in second.output, second.output

    a, b = (Store(h).resolve("student:latest") for h in homes)
    assert a.id == b.id and a.manifest.facts["lora_rank"] == 4
    from tmdcli.models.student import TMDStudent

    ta, tb = TMDStudent.load(a.path / "export").state_dict(), TMDStudent.load(b.path / "export").state_dict()
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)  # adapters + AdamW resumed
    assert not any("lora" in k for k in ta)  # a plain student: the adapters are merged
    start = TMDStudent.load(Store(homes[0]).resolve(init_ref(homes[0])).path / "export").state_dict()
    frozen = "transformer.patch_embedding.weight"
    adapted = "transformer.blocks.0.attn1.to_q.weight"
    assert torch.equal(ta[frozen], start[frozen])  # not a LoRA target: frozen
    assert not torch.equal(ta[adapted], start[adapted])  # W + B A moved
    assert any(not torch.equal(ta[k], start[k]) for k in ta if k.startswith("extras."))  # flow head: fully trained
    out = tmp_path / "cat.mp4"
    assert invoke("sample", "a cat", "--home", homes[0], "--out", out).exit_code == 0 and out.is_file()


def init_ref(home) -> str:
    return next(a.id for a in Store(home).list("student") if a.manifest.stage == "pretrain-head")


def test_lora_without_peft_exits_2_naming_the_extra(home, monkeypatch):
    import tmdcli.optional as optional

    write_tiny_latents(home)
    monkeypatch.setattr(optional, "available", lambda module: module != "peft")
    result = invoke(*LORA, "--method", "dmd2v", "--home", home)
    assert result.exit_code == 2, result.output
    assert "pip install 'tmdcli[lora]'" in result.output and "Traceback" not in result.output


def test_lora_targets_must_name_block_linears(home):
    write_tiny_latents(home)
    result = invoke(*LORA, "--method", "dmd2v", "--lora-targets", "to_q,nonsense", "--home", home)
    assert result.exit_code == 2 and "nonsense" in result.output and "Traceback" not in result.output
