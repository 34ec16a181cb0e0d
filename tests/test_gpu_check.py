"""benchmarks/gpu_check.sh, the prepared GPU check, runs here with --cpu (small sizes)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_script_runs_every_step_on_the_cpu(tmp_path):
    report = tmp_path / "gpu_check.md"
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", str(report)],
                            cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    text = report.read_text()
    assert "FAILED" not in text, text[-3000:]
    # (dense + sparse + capacity, capacity under XLA) in float32, then the LM run.
    assert text.count("ratio_vs_dense") == 3, text
    assert len(re.findall(r"\| MoE E=8 +\| capacity +\|", text)) == 2
    assert "jit_compile=True" in text and "dtype=float32" in text
    assert '"global_step": 10' in text and "test perplexity" in text
