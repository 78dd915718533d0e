"""Steps/s per phase of a toy training folder (toy/throughput.py), the record scripts/gpu_check.sh keeps."""

import json
import shutil

from tmdcli.toy import bundle, throughput


def test_rates_of_a_finished_run_come_from_its_metrics(tmp_path, capsys):
    (tmp_path / "bundle").mkdir()
    shutil.copy(bundle.BUNDLED_DIR / "metrics.json", tmp_path / "bundle" / "metrics.json")
    training = json.loads((bundle.BUNDLED_DIR / "metrics.json").read_text())["training"]
    assert throughput.main([str(tmp_path), "abc123"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["label"] == "abc123" and row["device"]
    vae = training["vae"]
    assert row["vae"]["mean_steps_per_s"] == vae["steps_this_run"] / vae["wall_s"]
    assert row["vae"]["logged_steps_per_s"] == vae["steps_per_s"] and row["teacher"]["batch"] > 0
    assert row["teacher"]["steps"] == training["teacher"]["steps_this_run"]


def test_rates_of_a_run_cut_short_come_from_its_checkpoints(tmp_path):
    for phase, step in (("vae", 40), ("teacher", 10)):
        (tmp_path / "ckpt" / phase).mkdir(parents=True)
        (tmp_path / "ckpt" / phase / "state.json").write_text(json.dumps(dict(step=step, elapsed_s=20.0)))
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(dict(batch=1024, vae_batch=64)))
    rates = throughput.phase_rates(tmp_path)
    assert rates["vae"]["mean_steps_per_s"] == 2.0 and rates["teacher"]["mean_steps_per_s"] == 0.5
    assert rates["teacher"]["batch"] == 1024 and rates["vae"]["vae_batch"] == 64


def test_not_a_folder_exits_2(tmp_path, capsys):
    assert throughput.main([str(tmp_path / "missing")]) == 2
    assert "usage" in capsys.readouterr().err
