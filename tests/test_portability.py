"""Portability: locks without fcntl (as on Windows), device selection, bf16 detection off Linux."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agentpeft import models, registry
from agentpeft.errors import AgentpeftError

ROOT = Path(__file__).resolve().parents[1]

#: Prepended to a subprocess's script: the import system then raises ImportError for fcntl.
NO_FCNTL = "import sys; sys.modules['fcntl'] = None\n"


def _python(script: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from agentpeft.registry import held_lock
    with held_lock(Path(sys.argv[1]), blocking=False, record_pid=True) as held:
        print(held, flush=True)
        time.sleep(600)
""")


@pytest.mark.parametrize("fcntl", [True, False], ids=["native", "without-fcntl"])
def test_a_held_lock_names_its_holder_and_dies_with_it(tmp_path, fcntl):
    """A second holder is refused at once with the first one's pid; after a SIGKILL of the first, it gets the lock."""
    lock = tmp_path / "build-bot.lock"
    prefix = "" if fcntl else NO_FCNTL
    holder = subprocess.Popen([sys.executable, "-c", prefix + HOLD, str(lock)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        held = holder.stdout.readline().strip()
        assert held, "the holder did not take the lock"
        probe = _python(prefix + textwrap.dedent(f"""
            from pathlib import Path
            from agentpeft.registry import LockBusy, held_lock
            try:
                with held_lock(Path({str(lock)!r}), blocking=False):
                    print("taken")
            except LockBusy as busy:
                print("busy", busy.holder, busy.path)
        """), timeout=120)
        assert probe.stdout.split() == ["busy", str(holder.pid), held], probe.stderr
    finally:
        holder.kill()
        holder.wait()
    again = _python(prefix + textwrap.dedent(f"""
        from pathlib import Path
        from agentpeft.registry import held_lock
        with held_lock(Path({str(lock)!r}), blocking=False):
            print("taken")
    """), timeout=120)
    assert again.stdout.strip() == "taken", again.stderr


def test_without_fcntl_a_symlinked_lock_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("a.lock", "b.lock.held"):
        (tmp_path / name).symlink_to(victim)
    result = _python(NO_FCNTL + textwrap.dedent(f"""
        from pathlib import Path
        from agentpeft.errors import AgentpeftError
        from agentpeft.registry import held_lock
        for path in ("a.lock", "b.lock"):
            try:
                with held_lock(Path({str(tmp_path)!r}) / path):
                    print("taken")
            except AgentpeftError as exc:
                print(exc)
    """), timeout=120)
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("is a symbolic link" in line for line in lines), result.stdout + result.stderr
    assert victim.read_text() == "precious"


def test_a_build_without_fcntl_registers(tiny_base, tmp_path):
    """The registry and the build import without fcntl, and a build of the tiny model registers."""
    home = tmp_path / "home"
    result = _python(NO_FCNTL + textwrap.dedent(f"""
        import sys
        sys.path.insert(0, "tests")
        import agentpeft.registry, agentpeft.pipeline.build
        assert not agentpeft.registry.NATIVE_LOCKS
        from pathlib import Path
        from conftest import build_tiny
        built = build_tiny(Path({str(tiny_base)!r}), "bot", max_steps=1)
        print("registered", built.name, built.version)
    """), env={"AGENTPEFT_HOME": str(home)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "registered bot 1"
    assert json.loads((home / "registry" / "bot" / "1" / "manifest.json").read_text())["version"] == 1
    assert not (home / "locks" / "build-bot.lock.held").exists()  # released at the end


def test_registry_locks_of_two_names_are_independent(home):
    with registry._lock("a") as folder, registry._lock("b"):
        assert folder == home / "registry" / "a"
    with registry._lock("a"):  # released above: taken again at once
        pass


@pytest.mark.parametrize(("caps", "expected"), [
    ({"architecture": "x86_64", "avx512_bf16": True}, True),
    ({"architecture": "x86_64", "amx_bf16": True, "avx512_bf16": False}, True),
    ({"architecture": "x86_64", "avx2": True, "avx512_bf16": False, "amx_bf16": False}, False),
    ({"architecture": "arm64", "bf16": True}, True),
    ({"architecture": "arm64", "neon": True, "bf16": False}, False),
])
def test_cpu_bf16_comes_from_torchs_feature_detection(monkeypatch, caps, expected):
    import torch

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: pytest.fail("read /proc/cpuinfo"))
    assert models.cpu_bf16_supported() is expected


def test_cpu_bf16_falls_back_to_proc_cpuinfo_then_no(monkeypatch):
    import torch

    monkeypatch.delattr(torch.cpu, "get_capabilities")
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "flags : fpu avx512_bf16 sse")
    assert models.cpu_bf16_supported() is True

    def missing(self, *args, **kwargs):
        raise FileNotFoundError(str(self))

    monkeypatch.setattr(Path, "read_text", missing)  # macOS, Windows
    assert models.cpu_bf16_supported() is False


@pytest.mark.parametrize(("cuda", "mps", "expected"), [(True, True, "cuda"), (False, True, "mps"),
                                                        (False, False, "cpu")])
def test_device_selection_knows_cuda_mps_and_cpu(monkeypatch, cuda, mps, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert models._device() == expected
    assert models.inference_bf16("mps") is False  # MPS generates in the model's own precision


def test_a_model_moves_to_mps_for_inference(monkeypatch):
    """On Apple silicon ``for_inference`` moves a CPU model to the MPS device, in its own precision."""
    import torch

    moved = []

    class Model:
        device = torch.device("cpu")

        def to(self, device):
            moved.append(device)
            return self

    monkeypatch.setattr(models, "_device", lambda: "mps")
    monkeypatch.setattr(models, "inference_bf16", lambda device=None: False)
    model = Model()
    model.dtype = torch.float32
    assert models.for_inference(model) is model and moved == ["mps"]


def test_a_dangling_symlinked_lock_creates_nothing(tmp_path):
    (tmp_path / "x.lock").symlink_to(tmp_path / "nowhere")
    with pytest.raises(AgentpeftError, match="symbolic link"):
        with registry.held_lock(tmp_path / "x.lock"):
            pass
    assert not (tmp_path / "nowhere").exists()
