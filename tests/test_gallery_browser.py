"""gallery.html in a real browser: a small `tmd eval --suite toy` opened from disk in headless Chromium.

Checked in the page itself: every video loads and plays, the tables show what results.json holds, and the page still
works once the eval folder is moved. Also gallery.png (the screenshot `tmd eval` takes) and what happens without a
browser. The browser tests skip without a Chromium binary; CI installs Debian's `chromium-headless-shell` (.ci/run).
"""

import json
import shutil
import struct
from pathlib import Path
from urllib.parse import unquote

import pytest
from typer.testing import CliRunner

from tmdcli.cli import app
from tmdcli.evaluation import browser

runner = CliRunner()
CHROMIUM = browser.find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason=f"no Chromium binary on PATH (looked for "
                                                             f"{', '.join(browser.BINARIES)}); {browser.INSTALL_HINT}")
# Two cheap models and 1 train + 1 held-out caption x 2 seeds: 8 clips, every table cell filled for some model.
ARGS = ["eval", "--suite", "toy", "--model", "toy@1", "--model", "toy@2", "--toy-prompts", "1",
        "--samples-per-prompt", "2", "--batch-size", "8"]

# Plays every video from 0 for half a second (no loop, so time cannot wrap), then reads the tables as text:
# the metrics table's cells, and per prompt the header cells and each row's video sources.
PROBE = """(async () => {
  const videos = [...document.querySelectorAll('video')];
  for (const v of videos) { v.pause(); v.loop = false; v.currentTime = 0; }
  const started = await Promise.all(videos.map(v => v.play().then(() => null, e => String(e))));
  const t0 = videos.map(v => v.currentTime);
  await new Promise(r => setTimeout(r, 500));
  const text = c => c.innerText.trim();
  const tables = [...document.querySelectorAll('table')];
  return {
    played: videos.map((v, i) => ({src: v.getAttribute('src'), t0: t0[i], t1: v.currentTime, started: started[i],
                                   error: v.error && v.error.code})),
    table: [...tables[0].rows].map(r => [...r.cells].map(text)),
    sections: tables.slice(1).map(t => [...t.rows].map(r => [...r.cells].map(
      c => c.querySelector('video') ? c.querySelector('video').getAttribute('src') : text(c)))),
  };
})()"""


@pytest.fixture(scope="module")
def toy_eval(tmp_path_factory):
    home = tmp_path_factory.mktemp("gallery") / "H"
    result = runner.invoke(app, [*ARGS, "--home", str(home)])
    assert result.exit_code == 0, result.output
    root = Path(result.stdout.strip())
    return root, json.loads((root / "results.json").read_text()), home


def check_videos_loaded(states: list[dict], results: dict) -> None:
    """Every clip of results.json is on the page once, has a frame (HAVE_CURRENT_DATA) and no media error."""
    expected = sorted(f"{m['sample_dir']}/{name}" for m in results["models"] for names in m["files"] for name in names)
    assert sorted(unquote(s["src"]) for s in states) == expected
    for s in states:
        assert s["readyState"] >= 2 and s["error"] is None and s["duration"] > 0, s


def number(cell: str) -> float | None:
    return None if cell == "-" else float(cell)


def check_metrics_table(rows: list[list[str]], results: dict) -> None:
    """One row per model and split: its label, kind, NFE and every metric column as results.json holds them (the
    page prints 4 significant digits), and seconds per video as total / num_videos."""
    from tmdcli.evaluation.toy import TOY_METRICS

    header, body = rows[0], rows[1:]
    key_of = {name: key for key, (name, _, _) in TOY_METRICS.items()}
    metric_cols = [(i, key_of[h]) for i, h in enumerate(header) if h in key_of]
    assert header[:4] == ["model", "split", "kind", "NFE"] and len(metric_cols) == len(header) - 5
    expected = [(m, split) for m in results["models"] for split in ("train", "heldout")]
    assert len(body) == len(expected)
    for row, (m, split) in zip(body, expected):
        assert row[0].split()[0] == m["label"] and row[1] == split and row[2] == m["kind"]
        assert float(row[3]) == m["effective_nfe"]
        for i, key in metric_cols:
            value = m["splits"][split].get(key)  # the reference has no distance to itself: "-"
            assert number(row[i]) == (None if value is None else pytest.approx(value, rel=1e-3, abs=1e-9)), key
        t = m["timings"]
        assert float(row[-1].split()[0]) == pytest.approx(t["total_s"] / t["num_videos"], rel=1e-2)
    assert sum(number(c) not in (None, 0.0) for row in body for i, _ in metric_cols for c in [row[i]]) >= 8


def check_sections(sections: list[list[list[str]]], results: dict) -> None:
    """Per prompt: a column per model headed by its label and NFE, a row per seed with that model's clip."""
    models = results["models"]
    assert len(sections) == len(results["prompts"])
    for p, (section, prompt) in enumerate(zip(sections, results["prompts"])):
        assert section[0] == ["seed"] + [f"{m['label']}\nNFE {m['effective_nfe']:g}" for m in models]
        assert [int(row[0]) for row in section[1:]] == prompt["seeds"]
        for i, row in enumerate(section[1:]):
            assert [unquote(src) for src in row[1:]] == [f"{m['sample_dir']}/{m['files'][p][i]}" for m in models]


@needs_chromium
def test_gallery_plays_and_shows_results_json_in_headless_chromium(toy_eval, tmp_path, capsys):
    root, results, _ = toy_eval
    elsewhere = tmp_path / "moved" / "deeper" / "copy-of-eval"
    with browser.Chromium(timeout=60) as page:
        page.open(root / "gallery.html")
        check_videos_loaded(page.wait_for_videos(ms=15_000), results)
        seen = page.evaluate(PROBE)
        for v in seen["played"]:
            assert v["started"] is None and v["error"] is None, v
            assert v["t1"] > v["t0"] and v["t1"] >= 0.1, v  # time advances while playing
        check_metrics_table(seen["table"], results)
        check_sections(seen["sections"], results)

        elsewhere.parent.mkdir(parents=True)
        shutil.move(root, elsewhere)  # the original folder is gone: only relative paths can still resolve
        try:
            page.open(elsewhere / "gallery.html")
            check_videos_loaded(page.wait_for_videos(ms=15_000), results)
        finally:
            shutil.move(elsewhere, root)
    with capsys.disabled():  # say so: a pass here means a browser really played the page, not a skip
        print(f"\n[gallery] ran in {CHROMIUM}: {len(seen['played'])} videos loaded and played, tables match "
              f"results.json, paths hold after a move")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


@needs_chromium
def test_eval_saves_a_screenshot_of_the_gallery_and_show_lists_it(toy_eval):
    from PIL import Image

    root, _, home = toy_eval
    data = (root / "gallery.png").read_bytes()
    width, height = png_size(data)
    assert width == browser.WINDOW_SIZE[0] and 400 < height <= browser.WINDOW_SIZE[1]
    colours = Image.open(root / "gallery.png").convert("RGB").getcolors(maxcolors=1 << 24)
    assert len(colours) > 5000  # decoded clips, not black boxes and text
    assert "![gallery.html as headless Chromium renders it](gallery.png)" in (root / "report.md").read_text()
    shown = runner.invoke(app, ["show", "eval:latest", "--home", str(home)])
    assert shown.exit_code == 0 and "screenshot: gallery.png" in shown.stdout


# ---- without a (working) browser: a note, never a failed eval ------------------------------------------------


def fake_browser(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-chromium"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_missing_chromium_is_a_clear_browser_error(monkeypatch):
    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    with pytest.raises(browser.BrowserError, match="no Chromium binary on PATH.*apt-get install chromium-headless"):
        browser.gallery_screenshot("gallery.html")


@pytest.mark.parametrize("body,needle", [("echo 'boom: no display' >&2; exit 3", "exited .code 3.*boom"),
                                         ("exec sleep 30", "did not answer within 1 s")])
def test_crashing_or_hanging_chromium_is_a_browser_error_within_the_timeout(tmp_path, monkeypatch, body, needle):
    import time

    monkeypatch.setattr(browser, "find_chromium", lambda: fake_browser(tmp_path, body))
    start = time.monotonic()
    with pytest.raises(browser.BrowserError, match=needle):
        browser.gallery_screenshot(tmp_path / "gallery.html", timeout=1)
    assert time.monotonic() - start < 10  # the hanging one is killed, not waited for


def test_eval_notes_a_skipped_screenshot_and_removes_a_stale_one(tmp_path, monkeypatch):
    from tmdcli.artifacts.store import Store
    from tmdcli.evaluation.report import report_markdown
    from tmdcli.stages import eval as stage

    staging = Store(tmp_path / "H").begin(kind="eval", stage="eval", stage_version=1, config={"x": 1},
                                          identity_config={"x": 1})
    staging.write_bytes("gallery.html", b"<html></html>")
    staging.write_bytes("gallery.png", b"stale")  # from an interrupted run that had a browser
    monkeypatch.setattr(browser, "find_chromium", lambda: fake_browser(tmp_path, "exit 1"))
    reason = stage._screenshot_gallery(staging)
    assert "Chromium exited" in reason and not (staging.path / "gallery.png").exists()
    results = {"suite": "quick", "settings": {"num_prompts": 1, "samples_per_prompt": 1, "seed_rule": "s",
                                              "video": [9, 32, 32], "prompts_sha256": "0" * 64},
               "models": [{"label": "m", "kind": "teacher", "effective_nfe": 2.0, "metrics": {}}]}
    page = report_markdown(results, screenshot_skipped=reason)
    assert f"gallery.png not taken: {reason}" in page and "](gallery.png)" not in page
    assert "`gallery.png`" not in page and "`gallery.png`" in report_markdown(results)
