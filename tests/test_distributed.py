"""The multi-process path: `accelerate launch` with two CPU processes runs the same command line."""

import json
import os
import shutil
import subprocess
import sys

import pytest


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not on PATH")
def test_accelerate_launch_trains_data_parallel_on_two_cpu_processes(tiny_base, tmp_path):
    # `accelerate launch --cpu` starts a single process; --multi_gpu with no GPU starts torchrun
    # workers that the Trainer runs as MULTI_CPU (gloo) data parallelism.
    env = {**os.environ, "AGENTPEFT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "agentpeft", "train", "support-bot", "--base", str(tiny_base), "--method", "lora",
           "--max-steps", "2", "--batch-size", "4", "--quiet"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "trained data-parallel on 2 processes" in run.stdout
    builds = list((tmp_path / "home" / "builds" / "support-bot").iterdir())
    assert len(builds) == 1  # both ranks used one build folder
    log = [json.loads(line) for line in (builds[0] / "train_log.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in log if "loss" in row]
    assert steps == [1, 2]
    # Two processes of 4 examples each: one optimizer step sees 8 examples, of an epoch that trains one
    # phrasing of each fact (the recipe's rotate_phrasings) and every train-only pair.
    from datasets import load_from_disk
    from agentpeft.pipeline.train import phrasing_rotation

    facts, always = phrasing_rotation(load_from_disk(str(builds[0] / "data" / "dataset"))["train"])
    assert log[-1]["epoch"] == pytest.approx(2 * 8 / (len(facts) + len(always)), rel=0.05)
    assert (builds[0] / "adapter" / "adapter_model.safetensors").is_file()
