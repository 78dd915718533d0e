"""benchmarks/sample_speed.py --quick runs on the CPU with tiny-random components and writes every section."""

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_quick_benchmark_writes_every_section(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("sample_speed", None)
    import sample_speed

    out = tmp_path / "speed.json"
    sample_speed.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    for key in ("torch", "diffusers", "matmul_tflops", "text_encoder_s", "mp4_write_s", "best_exact_decoder"):
        assert result[key] is not None, key
    decode = result["decode"]
    assert decode["stock_fp32"]["psnr_vs_fp32"] is None and decode["stock_fp32"]["max_abs_diff_vs_fp32"] == 0.0
    assert decode["chunked4_fp32"]["psnr_vs_fp32"] > 100  # exact within fp32 rounding
    assert 20 < decode["chunked4_bf16"]["psnr_vs_fp32"] < 100  # close, not exact
    assert decode["taehv_bf16"]["frames"] == decode["stock_fp32"]["frames"]  # 9 frames of 32x32 either way
    [stack] = result["stacks"]
    assert "error" not in stack, stack.get("error")
    teacher, student = stack["models"]
    assert teacher["effective_nfe"] == 4 and student["effective_nfe"] == 1.25
    assert student["predicted_speedup"] == 4 / 1.25
    for row in (teacher, student):
        assert row["transformer_s"] > 0 and 0 < row["mfu"]
        assert row["end_to_end_exact_s"] > row["transformer_s"]
