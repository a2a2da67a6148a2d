"""bench/gpu_train.py runs small on CPU, so the GPU benchmark cannot rot between GPU runs."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_train_benchmark_runs_small_on_cpu(home, tmp_path):
    out = tmp_path / "gpu_train_small.json"
    env = {**os.environ, "AGENTPEFT_HOME": str(home), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--small", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["side"] for r in result["runs"]] == ["agentpeft", "baseline"]
    for run in result["runs"]:
        assert run["steps"] == 2 and run["tokens"] > run["answer_tokens"] > 0
        assert run["peak_memory_gib"] > 0 and run["tokens_per_second"] > 0
    ours, baseline = result["runs"]
    # Executed FLOPs count each shared prompt prefix once and the LM head on answer positions only.
    assert ours["answer_tokens"] < ours["unique_tokens"] < ours["tokens"]
    assert 0 < ours["executed_flops"] < ours["model_flops"] and baseline["executed_flops"] is None
    assert 0 < result["summary"]["agentpeft"]["mfu_bf16_executed"] < result["summary"]["agentpeft"]["mfu_bf16"]
    rows = sorted(int(n) for n in result["layer_matmul_gflops"])
    assert rows and rows[0] > 0 and all(r["bfloat16"] > 0 for r in result["layer_matmul_gflops"].values())
    assert result["ratio_tokens_per_second"] > 0 and result["device"].startswith("CPU")
