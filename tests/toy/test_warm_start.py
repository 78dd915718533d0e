"""Warm-started toy training (toy/warm_start.py): weights start from a bundle, phases follow the VAE bar, and the
steps and wall time per phase add up over runs in metrics.json's training.totals. The committed bundle is only
read; every run writes under tmp_path."""

import json
import shutil

import pytest
import torch

from tmdcli.toy import bundle, train, warm_start


def test_totals_of_a_bundle_made_before_totals_are_its_single_run():
    committed = json.loads((bundle.BUNDLED_DIR / "metrics.json").read_text())
    totals = warm_start.previous_totals(committed)
    assert totals["vae"]["steps"] == committed["training"]["vae"]["steps"] > 0
    assert totals["teacher"]["steps"] == committed["training"]["teacher"]["steps"] > 0
    assert totals["teacher"]["wall_s"] == committed["training"]["teacher"]["elapsed_total_s"]
    assert totals["vae"]["runs"] == totals["teacher"]["runs"] == 1


def test_add_totals_adds_trained_phases_only():
    previous = dict(vae=dict(steps=10, wall_s=5.0, runs=1), teacher=dict(steps=20, wall_s=8.0, runs=1))
    out = warm_start.add_totals(previous, dict(vae=dict(steps=0, wall_s=0.0, frozen=True),
                                               teacher=dict(steps=7, wall_s=2.0, elapsed_total_s=3.0)))
    assert out == dict(vae=dict(steps=10, wall_s=5.0, runs=1), teacher=dict(steps=27, wall_s=11.0, runs=2))
    assert previous["teacher"]["steps"] == 20  # not modified in place
    assert warm_start.add_totals(None, dict(vae=dict(steps=3, wall_s=1.0), teacher=None))["vae"] == dict(
        steps=3, wall_s=1.0, runs=1)


@pytest.mark.parametrize("shape,holds", [(0.95, True), (0.94, False)])
def test_vae_bar_needs_every_attribute(shape, holds):
    metrics = {"vae": {"adherence": {"all": 0.1, "colour": 1.0, "shape": shape, "motion": 1.0, "background": 1.0}}}
    assert warm_start.vae_bar_holds(metrics) is holds
    assert warm_start.vae_bar_holds({}) is False


def _weights(folder, part):
    from safetensors.torch import load_file

    return load_file(str(folder / part / "diffusion_pytorch_model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_warm_started_runs_start_from_the_bundle_and_add_up(tmp_path, capsys):
    tiny = ["--device", "cpu", "--vae-steps", "2", "--vae-batch", "2", "--vae-image-batch", "2", "--teacher-steps",
            "3", "--batch", "2", "--pool-size", "8", "--caption-variants", "0", "--stats-clips", "8",
            "--eval-prompts", "2", "--eval-steps", "2", "--log-every", "1", "--threads", "1", "--no-calibrate"]
    committed = json.loads((bundle.BUNDLED_DIR / "metrics.json").read_text())
    before = {part: _weights(bundle.BUNDLED_DIR, part) for part in ("vae", "transformer")}
    assert not warm_start.vae_bar_holds(committed)  # the shipped VAE misses its bar: it trains, the teacher waits

    # run 1: from the committed bundle, lr 0 so that "starts from the bundle" is exact equality of the weights
    first = tmp_path / "run1"
    assert train.main(["--out", str(first), "--warm-start", "bundle", "--vae-lr", "0", *tiny]) == 0
    metrics = json.loads((first / "bundle/metrics.json").read_text())
    assert _same(_weights(first / "bundle", "vae"), before["vae"])  # no random init, no posterior reset
    assert _same(_weights(first / "bundle", "transformer"), before["transformer"])  # carried over
    training = metrics["training"]
    assert training["vae"]["steps"] == 2 and training["teacher"]["carried_over"] is True
    old = warm_start.previous_totals(committed)
    assert training["totals"]["vae"]["steps"] == old["vae"]["steps"] + 2
    assert training["totals"]["vae"]["wall_s"] == pytest.approx(old["vae"]["wall_s"]
                                                                + training["vae"]["elapsed_total_s"])
    assert training["totals"]["teacher"] == old["teacher"]
    assert training["warm_start"] == dict(source=str(bundle.BUNDLED_DIR), vae_bar_held=False)

    # run 2: from run 1's bundle, its VAE marked as meeting the bar: the VAE is frozen, the teacher trains on
    source = tmp_path / "source"
    shutil.copytree(first / "bundle", source)
    marked = json.loads((source / "metrics.json").read_text())
    marked["vae"]["adherence"].update(colour=1.0, shape=1.0, motion=1.0, background=1.0)
    (source / "metrics.json").write_text(json.dumps(marked))
    second = tmp_path / "run2"
    # another seed draws another latent pool: re-measured statistics would differ from the kept ones
    assert train.main(["--out", str(second), "--warm-start", str(source), "--lr", "0", "--seed", "1", *tiny]) == 0
    metrics = json.loads((second / "bundle/metrics.json").read_text())
    training = metrics["training"]
    assert training["vae"]["frozen"] is True and training["teacher"]["steps"] == 3
    assert _same(_weights(second / "bundle", "vae"), _weights(source, "vae"))
    assert _same(_weights(second / "bundle", "transformer"), _weights(source, "transformer"))  # lr 0, from source
    src_cfg = json.loads((source / "vae/config.json").read_text())
    assert json.loads((second / "bundle/vae/config.json").read_text())["latents_mean"] == src_cfg["latents_mean"]
    totals = marked["training"]["totals"]
    assert training["totals"]["vae"] == totals["vae"]
    assert training["totals"]["teacher"]["steps"] == totals["teacher"]["steps"] + 3
    assert training["totals"]["teacher"]["runs"] == totals["teacher"]["runs"] + 1
    assert training["totals"]["teacher"]["wall_s"] == pytest.approx(totals["teacher"]["wall_s"]
                                                                    + training["teacher"]["elapsed_total_s"])
    assert _same(_weights(bundle.BUNDLED_DIR, "vae"), before["vae"])  # the committed bundle is untouched
