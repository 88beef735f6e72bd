"""eval/gpu_check.sh runs every GPU check; here its dry run (tiny sizes, CPU, Triton's interpreter)."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_a_failing_step_prints_the_end_of_its_log(tmp_path, capsys, eval_script):
    argv = ["-c", "import sys; print('loading'); sys.exit('the reason it failed')"]
    ok, _ = eval_script("gpu_check").run("broken", argv, tmp_path)
    printed = capsys.readouterr().err
    assert not ok and "the reason it failed" in printed and "[broken] FAILED" in printed
    assert "the reason it failed" in (tmp_path / "broken.log").read_text()


def test_a_bench_step_whose_mlp_peak_is_zero_gets_no_peak_ratio(eval_script):
    rows = {"mlp": {"time": 1.0, "peak": 0}, "kan": {"time": 2.0, "peak": 5}}
    assert eval_script("gpu_check").bench_rows({"bench_eager": rows}) == [
        ("KAN block / MLP, eager: fwd+bwd time", "2.00x"),
        ("KAN block / MLP, eager: peak memory", "n/a"),
    ]


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_cpu_as_a_dry_run(tmp_path):
    pytest.importorskip("triton", reason="the check runs the Triton kernels (here in the interpreter)")
    done = subprocess.run(
        ["bash", str(ROOT / "eval" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(ok for ok, _ in summary["status"].values()) and len(summary["status"]) == 7
    table = done.stdout
    for check in (
        "KAN block / MLP, triton: fwd+bwd time",
        "124M training peak VRAM, KAN / GPT-2 measured",
        "train.py tokens/s, KAN / GPT-2",
    ):
        assert check in table
    assert (tmp_path / "compare" / "compare.json").is_file() and (tmp_path / "train_kan" / "model").is_dir()
