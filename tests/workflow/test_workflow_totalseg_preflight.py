"""segment.backend totalsegmentator without its weights stops the workflow at parse time, before
any job, with the fix; with the fast model's folder (random weights, tests/totalseg_weights.py) the
same run plans its jobs."""

import pytest
import yaml

from totalseg_weights import SMALL, task_folder, write_model

from snakemake_run import snakemake

pytest.importorskip("totalsegmentator", reason="TotalSegmentator not installed (make install-test installs it)")


def test_missing_totalsegmentator_weights_stop_the_run_before_any_job(tmp_path):
    home = tmp_path / "totalseg_home"
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.yaml").write_text(yaml.safe_dump(
        {"segment": {"backend": "totalsegmentator", "fast": True, "device": "cpu", "weights_dir": str(home)}}))
    out = snakemake(wd, "-n")
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert task_folder(297) in text and "totalseg_download_weights -t total_fast" in text
    assert str(home / "nnunet" / "results") in text
    assert not (wd / "results").exists()

    write_model(home, 297, SMALL)  # only the fast model's folder: enough for segment.fast
    out = snakemake(wd, "-n")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cohort" in out.stdout + out.stderr
