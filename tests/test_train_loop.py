"""The shared training loop: exact resume, checkpoints written whole, non-finite stops, accumulation, metrics."""

import json

import pytest
import torch

from tmdcli.data.loaders import LatentLoader
from tmdcli.errors import StageError, UsageError
from tmdcli.runtime import checkpoint as ckpt
from tmdcli.runtime.train_loop import LoopConfig, MetricsLog, accumulation_steps, make_adamw, run_loop

from conftest import write_tiny_latents


class Regressor(torch.nn.Module):
    """A small model with dropout (global RNG) and per-iteration noise (the iteration generator)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 16))

    def forward(self, batch, generator, nan_at=None, iteration=0):
        x = batch["latents"].mean(dim=(2, 3, 4))  # (B, 16)
        noise = torch.randn(x.shape, generator=generator)
        loss = (self.net(x + noise) - x).pow(2).mean()
        if nan_at is not None and iteration + 1 == nan_at:
            loss = loss * float("nan")
        return loss, {"loss": loss.detach()}


def _train(home, latents, *, iters=6, stop_after=None, nan_at=None, save_every=2, batch=2, micro_batch=1):
    model = Regressor()
    opt = make_adamw(model.parameters(), 1e-2)
    loader = LatentLoader(latents, batch_size=micro_batch, seed=0, rank=0, world_size=1)
    cfg = LoopConfig(iters=iters, batch=batch, micro_batch=micro_batch, save_every=save_every, log_every=1,
                     stop_after=stop_after, seed=0)
    result = run_loop(cfg, modules={"m": model}, optimizers={"m": opt},
                      step_fn=lambda it, b, g: model(b, g, nan_at=nan_at, iteration=it), schedule=lambda it: ("m",),
                      loader=loader, ckpt_root=home / "ckpt", metrics=MetricsLog(home / "metrics.jsonl"),
                      device=torch.device("cpu"), grad_clip={"m": 10.0})
    return model, opt, result


def _records(home):
    lines = (home / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("its_per_s", "elapsed_s")} for line in lines]


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    latents = write_tiny_latents(tmp_path / "data", n=5)  # 5 items, micro-batch 1, batch 2: epochs wrap mid-step
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    full, full_opt, _ = _train(a, latents, iters=7)
    first, _, stopped = _train(b, latents, iters=7, stop_after=3)
    assert not stopped.finished and stopped.iteration == 3
    resumed, resumed_opt, result = _train(b, latents, iters=7)
    assert result.finished and result.resumed_from == 3
    for (name, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    for s1, s2 in zip(full_opt.state_dict()["state"].values(), resumed_opt.state_dict()["state"].values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert _records(a) == _records(b)  # metrics.jsonl cut back to the checkpoint, then continued identically


def test_checkpoints_hold_everything_needed_and_old_ones_are_pruned(tmp_path):
    latents = write_tiny_latents(tmp_path / "data", n=4)
    _train(tmp_path, latents, iters=6, save_every=2)
    found = ckpt.list_checkpoints(tmp_path / "ckpt")
    assert [i for i, _ in found] == [4, 6]  # keep 2
    folder = found[-1][1]
    assert {p.name for p in folder.iterdir()} == {"model-m.safetensors", "optim-m.pt", "rng.pt", "state.json"}
    state = ckpt.read_state(folder)
    assert state["iteration"] == 6 and state["loader"]["position"] in range(0, 5)
    # a checkpoint cut short by a kill (a .partial folder) is never taken
    (tmp_path / "ckpt" / "iter-0000008.partial-123").mkdir()
    assert ckpt.latest_checkpoint(tmp_path / "ckpt") == folder


def test_non_finite_loss_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path):
    latents = write_tiny_latents(tmp_path / "data", n=4)
    with pytest.raises(StageError) as err:
        _train(tmp_path, latents, iters=6, nan_at=5, save_every=2)
    assert "iteration 5" in err.value.message and "last good checkpoint is iteration 4" in err.value.message
    assert ckpt.latest_checkpoint(tmp_path / "ckpt").name == "iter-0000004"


def test_global_batch_must_split_into_micro_batches_over_the_gpus():
    assert accumulation_steps(64, 1, 8) == 8
    assert accumulation_steps(64, 2, 4) == 8
    with pytest.raises(UsageError, match="not a multiple"):
        accumulation_steps(64, 3, 1)


def test_accumulated_micro_batches_equal_one_large_batch(tmp_path):
    """batch 4 as 4 micro-batches of 1 and as 2 of 2 give the same update (up to float summation order)."""
    latents = write_tiny_latents(tmp_path / "data", n=8)

    class NoDropout(Regressor):
        def forward(self, batch, generator, **_):
            x = batch["latents"].mean(dim=(2, 3, 4))
            self.eval()
            return (self.net(x) - x).pow(2).mean(), {}

    results = []
    for micro in (1, 2):
        model = NoDropout()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = LatentLoader(latents, batch_size=micro, seed=0, shuffle=False, rank=0, world_size=1)
        run_loop(LoopConfig(iters=1, batch=4, micro_batch=micro, save_every=10), modules={"m": model},
                 optimizers={"m": opt}, step_fn=lambda it, b, g, m=model: m(b, g), schedule=lambda it: ("m",),
                 loader=loader, ckpt_root=tmp_path / f"c{micro}", metrics=MetricsLog(tmp_path / f"m{micro}.jsonl"),
                 device=torch.device("cpu"))
        results.append(model.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-6)
