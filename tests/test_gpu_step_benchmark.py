"""benchmarks/gpu_step.py runs ctvlp's real training paths; here at tiny size on the CPU, which
also measures what needs no GPU: host syncs per step, the loader's rate, the VQ-VAE's padding."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_step_benchmark_runs_on_the_cpu_and_reports_syncs(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--size", "tiny", "--device", "cpu",
                          "--out", str(tmp_path), "--label", "t"], capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_step_t.json").read_text())
    assert "CPU" in r["device"] and r["peak_tflops"] > 0 and r["encoder"]["flops_per_sample"] > 0
    phases = {p["phase"]: p for p in r["phases"]}
    assert set(phases) == {"visual_cl", "align", "boost"}
    for p in phases.values():
        assert p["samples_per_s"] > 0 and 0 < p["pct_of_peak"] < 100
    # no host sync in the steps of phases 1 and 2 (the loop syncs once per train.sync_every steps)
    assert phases["visual_cl"]["syncs_from_ctvlp_per_step"] == 0, phases["visual_cl"]["sync_sites"]
    assert phases["align"]["syncs_from_ctvlp_per_step"] == 0, phases["align"]["sync_sites"]
    # phase 4 gathers the anatomy rows (their number and lengths come from the data) and buckets them
    assert 0 < phases["boost"]["syncs_from_ctvlp_per_step"] <= 4, phases["boost"]["sync_sites"]
    assert 0 <= phases["boost"]["vq_pad_pct"] < phases["boost"]["vq_pad_pct_unbucketed"] < 100
    assert r["loader"]["crops_per_s"] > 0 and r["loader"]["ratio_to_phase2"] > 0
    md = (tmp_path / "gpu_step_t.md").read_text()
    assert "| align | 2 |" in md and r["device"] in md
