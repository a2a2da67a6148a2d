"""bench/profile_train.py runs on the tiny model and splits the matmuls into base, adapter and LM head."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_profile_train_groups_a_steps_cpu_time(registered, tiny_base, tmp_path):
    dataset = next((registered["home"] / "builds" / "support-bot").glob("*/data/dataset"))
    out = tmp_path / "profile.json"
    env = {**os.environ, "AGENTPEFT_HOME": str(registered["home"])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_train.py"), "--dataset", str(dataset),
                           "--base", str(tiny_base), "--warmup", "1", "--steps", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    groups = {row["group"]: row for row in result["groups"]}
    assert {"mm: base model", "mm: LoRA adapter", "mm: LM head"} <= set(groups)
    assert groups["mm: LM head"]["calls"] < groups["mm: base model"]["calls"] < groups["mm: LoRA adapter"]["calls"]
    shares = [row["share"] for row in result["groups"]]
    assert all(share >= 0 for share in shares) and abs(sum(shares) - 1) < 0.01  # every group is in the file
    assert result["profiled_steps"] == 1 and result["self_cpu_ms"] > 0
