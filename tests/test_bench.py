"""bench/gpu.py (`make bench-gpu`) runs its every step at tiny sizes on the CPU, so that the first GPU
it meets runs tested code: the comparison against PEFT + Trainer, the plans against measured peaks,
and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_bench_gpu_quick_runs_every_step_and_writes_its_report(tiny_paligemma, tiny_qwen2_5_vl, shapes_data,
                                                               tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu.py"), "--quick", "--data", str(shapes_data),
                           "--demo-model", str(tiny_paligemma), "--qwen-model", str(tiny_qwen2_5_vl),
                           "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [report] = out.glob("*-bench-gpu-quick.json")
    report = json.loads(report.read_text())
    summary = report["compare"]["summary"]
    assert summary["minivlm"]["samples_per_s"] > 0 and summary["peft"]["samples_per_s"] > 0
    assert max(summary["loss_rel_diff"]) <= 0.02  # the two sides trained the same job
    for name in ("demo", "compare"):
        plan = report["plans"][name]
        assert plan["planned_mib"] > plan["planned_without_context_mib"] > 0 and plan["measured_mib"] > 0
    packed = report["packing"]
    assert packed["plain"]["padding"] > 0.05 and packed["packing"]["padding"] == 0  # the pair measured what it says
    assert packed["group_by_length"]["padding"] < packed["plain"]["padding"]
    assert all(packed[mode]["steps"] == 2 and packed[mode]["tokens_per_s"] > 0 for mode in ("plain", "packing"))
    text = next(out.glob("*-bench-gpu-quick.md")).read_text()
    assert "minivlm against PEFT + Trainer" in text and "| configs/demo.toml |" in text and "| compare.py's tiny sizes |" in text
    assert "## Packing" in text and "| packing | 0.0% |" in text
