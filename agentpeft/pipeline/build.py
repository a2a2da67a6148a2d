"""``build``: run every stage in order and register the result."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import AgentpeftError, disk_error
from ..models import ALIASES, accepts_allow_pickle, base_info, home, load_tokenizer, resolve_base, tool_format
from ..recipe import Recipe, configure, get_recipe
from ..progress import set_enabled
from ..registry import LockBusy, check_name, held_lock, publish
from ..retrieval import KB_FILE, save_chunks
from .dataset import make_dataset
from .evaluate import EvalResult, evaluate
from .merge import merge
from .train import MERGEABLE, TrainResult, train

STAGES = ("ingest", "dataset", "train", "evaluate", "merge", "register")


@dataclass
class BuildResult:
    """The registered model and the figures of each stage."""

    name: str
    version: int | None
    path: Path | None
    eval: EvalResult | None
    build_dir: Path
    seconds: dict[str, float]
    train: TrainResult | None = None


def _exclusive(run: Callable[..., BuildResult]) -> Callable[..., BuildResult]:
    """Run a build holding its name's build lock, with ``allow_pickle``, disk errors made one line.

    A second build of the same name fails at once (it does not wait) with an error naming the lock.
    The lock is ``AGENTPEFT_HOME/locks/build-NAME.lock``, held with :func:`~agentpeft.registry.held_lock`:
    the operating system drops it when the holder dies, so a killed build never leaves a stale lock behind.
    """

    @functools.wraps(run)
    def wrapper(*args, **kwargs) -> BuildResult:
        bound = inspect.signature(run).bind(*args, **kwargs)
        if not isinstance(bound.arguments["recipe"], Recipe):
            bound.arguments["recipe"] = get_recipe(bound.arguments["recipe"])
        name = bound.arguments.get("name")
        name = check_name(bound.arguments["recipe"].name if name is None else name)
        if _rank() != 0:  # under `accelerate launch`, the main process holds the lock for all
            return run(*bound.args, **bound.kwargs)
        try:
            lock_path = home() / "locks" / f"build-{name}.lock"
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            try:  # held_lock never opens a symbolic link: that would create or truncate the file it points to
                with held_lock(lock_path, blocking=False, record_pid=True):
                    return run(*bound.args, **bound.kwargs)
            except LockBusy as busy:  # raised on entry only: the build itself never waits on this lock
                raise AgentpeftError(
                    f"another build of {name!r} is running (pid {busy.holder}, lock {busy.path}); "
                    f"wait for it to finish or build under another --name") from None
        except AgentpeftError:
            raise
        except Exception as exc:  # OSError, or a Rust library's error carrying one (disk_error)
            error = disk_error(exc)
            if error is None:
                raise
            raise AgentpeftError(f"{error} (a build cut short continues with --resume)") from exc

    return accepts_allow_pickle(wrapper)


@_exclusive
def build(recipe: str | Recipe, kb: str | Path | None = None, name: str | None = None,
          base: str | None = None, allow_regression: bool = False, resume: bool = False,
          show_progress: bool = True, log: Callable[[str], None] = print, until: str = "register",
          judge: str | None = None, eval_limit: int | None = None, data_mix: dict | None = None,
          system_prompt: str | None = None, retrieval: bool | str | None = None, merge_dtype: str | None = None,
          **train_overrides) -> BuildResult:
    """ingest -> dataset -> train -> evaluate -> merge -> register, each stage summarized in one line.

    ``train_overrides`` are TrainConfig fields (epochs, max_steps, method, r, lr, ...), ``data_mix``
    DataConfig fields (general, train_phrasings, ...); ``system_prompt`` replaces the recipe's;
    ``retrieval`` is True, False or "auto" (retrieval-augmented mode, see ``RetrievalConfig``);
    ``merge_dtype`` (bf16, fp16, fp32) replaces the recipe's ``merge.dtype``;
    ``resume`` continues the name's last unfinished build from its last checkpoint;
    ``until="train"`` stops after training (what ``agentpeft train`` runs); ``judge`` names a chat
    model that also grades the held-out replies (reported, never gating); ``eval_limit`` evaluates a
    seeded sample of at most that many held-out questions.
    """
    if until not in ("train", "register"):
        raise AgentpeftError(f"until must be 'train' or 'register', not {until!r}")
    set_enabled(show_progress)
    recipe = configure(recipe, kb, base, data_mix=data_mix, system_prompt=system_prompt, retrieval=retrieval,
                       merge_dtype=merge_dtype, **train_overrides)
    if eval_limit is not None:
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"max_questions": eval_limit})})
    name = check_name(name or recipe.name)
    if recipe.kb_path is None:
        raise AgentpeftError(f"recipe {recipe.name!r} has no knowledge base; pass --kb PATH")
    if recipe.tools:
        from ..tools import collect_tools

        collect_tools(recipe)  # an unknown tool name fails here, not after training
    stamp = _launch_time() or datetime.now(timezone.utc)
    if _rank() != 0:
        log = lambda line: None  # noqa: E731  (one copy of the log: the main process's)
    build_dir = (resume and _unfinished_build(name)) or home() / "builds" / name / stamp.strftime("%Y%m%dT%H%M%S")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def done(stage: str, summary: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 1)
        clock = now
        log(f"[{STAGES.index(stage) + 1}/{len(STAGES)}] {stage}: {summary} ({seconds[stage]:.0f}s)")

    if recipe.base_model not in ALIASES:
        resolve_base(recipe.base_model, log=log)  # a bad --base fails before any stage; aliases are pulled later
    previous = _dataset_hash(build_dir)
    # Ingest, then the dataset stage, skipped when the knowledge base and data settings are unchanged.
    with _main_process_first():
        data = make_dataset(recipe, out=build_dir / "data", log=log, on_stage=done)
    base_dir = resolve_base(recipe.base_model, log=log)
    documents = data.documents
    save_chunks(documents, build_dir / KB_FILE)  # the registered model carries its knowledge base (kb_search)
    if resume and previous and previous != data.card["hash"]:
        raise AgentpeftError(f"the knowledge base changed since the interrupted build in {build_dir}; "
                             "build again without --resume")

    train_data, train_cfg = data.path, recipe.train
    retrieval = uses_retrieval(recipe, data.card)
    if retrieval:
        from .raft import augment_dataset

        train_cfg = recipe.train.model_copy(update={"max_seq_len": max(recipe.train.max_seq_len,
                                                                       recipe.retrieval.max_seq_len)})
        raft = augment_dataset(data.path, documents, load_tokenizer(base_dir), recipe.retrieval.k,
                               recipe.retrieval.distractors, train_cfg.max_seq_len, recipe.data.seed)
        train_data = raft.path
        log(f"retrieval mode ({_retrieval_reason(recipe, data.card)}): {raft.summary()}")
    trained = train(base_dir, train_data, build_dir, train_cfg, resume=resume, log=log)
    done("train", trained.summary())
    if until == "train" or _rank() != 0:
        return BuildResult(name, None, None, None, build_dir, seconds, trained)

    from datasets import load_from_disk

    eval_rows = list(load_from_disk(str(data.path))["eval"])
    if recipe.eval.max_questions and len(eval_rows) > recipe.eval.max_questions:
        eval_rows = random.Random(recipe.data.seed).sample(eval_rows, recipe.eval.max_questions)
    ask = None
    if retrieval:  # both models are asked as load_llm will ask: with the passages kb_search retrieves
        from ..retrieval import PassageIndex
        from .raft import with_passages

        index = PassageIndex(documents)
        eval_rows = with_passages(eval_rows, index, recipe.retrieval.k)
        ask = functools.partial(with_passages, index=index, k=recipe.retrieval.k)
    result = evaluate(base_dir, trained.adapter_dir, eval_rows, recipe.eval.metrics, recipe.eval.primary,
                      build_dir / "eval", recipe.system_prompt, recipe.eval.max_new_tokens, recipe.eval.batch_size,
                      probe=recipe.eval.forgetting_probe, judge=judge, ask=ask)
    done("evaluate", result.summary() + (" (asked with retrieved passages)" if retrieval else ""))

    files = {"adapter": trained.adapter_dir, "dataset_card.md": build_dir / "data" / "dataset_card.md",
             "eval.json": build_dir / "eval" / "eval.json", "report.md": build_dir / "eval" / "report.md",
             "loss_curve.png": build_dir / "loss_curve.png", "metrics.png": build_dir / "eval" / "metrics.png",
             KB_FILE: build_dir / KB_FILE}
    merge_info = None
    if recipe.train.method in MERGEABLE:
        merged = merge(base_dir, trained.adapter_dir, build_dir / "merged", recipe.system_prompt,
                       dtype=recipe.merge.dtype)
        files["merged"] = merged.path
        merge_info = {"max_logit_diff": merged.max_logit_diff, "tolerance": merged.tolerance,
                      "dtype": merged.dtype, "stored_logit_diff": merged.stored_logit_diff}
        done("merge", merged.summary())
    else:
        done("merge", f"skipped: a {recipe.train.method} adapter cannot be merged; registered as base + adapter")

    if not result.improved and not allow_regression:
        log(f"[6/6] register: refused: the tuned model does not beat the base on {recipe.eval.primary} "
            f"({result.tuned[recipe.eval.primary]:.3f} vs {result.base[recipe.eval.primary]:.3f}); "
            f"nothing registered (--allow-regression overrides); build files in {build_dir}")
        (build_dir / "FINISHED").write_text("refused\n")
        return BuildResult(name, None, None, result, build_dir, seconds, trained)

    manifest = {
        "recipe": recipe.name,
        "description": recipe.description,
        "system_prompt": recipe.system_prompt,
        "base_model": base_info(base_dir),
        "knowledge_base": str(recipe.kb_path),
        "tools": list(recipe.tools),
        "tool_format": tool_format(load_tokenizer(base_dir)),
        "dataset": data.card,
        "train": {"config": recipe.train.model_dump(), "steps": trained.steps, "final_loss": trained.final_loss,
                  "seconds": round(trained.seconds, 1), "tokens": trained.tokens,
                  "trainable_params": trained.trainable_params, "all_params": trained.all_params,
                  "precision": trained.precision, "device": trained.device},
        "metrics": {"primary": result.primary, "base": result.base, "tuned": result.tuned,
                    "forgetting": result.forgetting, "judge": result.judge, "precision": result.precision,
                    "retrieval": retrieval},
        "retrieval": {**recipe.retrieval.model_dump(), "enabled": retrieval},
        "merge": merge_info,
        "allow_regression": bool(allow_regression and not result.improved),
        "created": stamp.isoformat(timespec="seconds"),
        "agentpeft_version": __version__,
        "build_dir": str(build_dir),
    }
    version, path = publish(name, files, manifest)
    (build_dir / "FINISHED").write_text(f"{name}@{version}\n")
    done("register", f"{name}@{version} -> {path}")
    return BuildResult(name, version, path, result, build_dir, seconds, trained)


def uses_retrieval(recipe: Recipe, card: dict) -> bool:
    """Whether the build trains, evaluates and serves in retrieval-augmented mode: ``retrieval.enabled``,
    or with ``auto`` when prose synthesis made at least ``retrieval.prose_share`` of the facts."""
    enabled = recipe.retrieval.enabled
    if enabled != "auto":
        return bool(enabled)
    return card.get("facts", 0) > 0 and prose_share(card) >= recipe.retrieval.prose_share


def prose_share(card: dict) -> float:
    """The share of a dataset's facts that prose synthesis made."""
    return card.get("per_generator", {}).get("prose", 0) / max(card.get("facts", 0), 1)


def _retrieval_reason(recipe: Recipe, card: dict) -> str:
    if recipe.retrieval.enabled == "auto":
        return f"auto: {prose_share(card):.0%} of the facts come from prose"
    return "retrieval.enabled"


def train_recipe(recipe: str | Recipe, **options) -> BuildResult:
    """ingest -> dataset -> train only: the adapter lands in the build folder, nothing is registered."""
    return build(recipe, until="train", **options)


def _rank() -> int:
    """This process's rank under ``accelerate launch`` (torchrun sets RANK); 0 when run alone."""
    return int(os.environ.get("RANK", "0"))


def _launch_time() -> datetime | None:
    """Under ``accelerate launch``, the launcher's start time: every rank picks the same build folder."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import psutil

    return datetime.fromtimestamp(int(psutil.Process(os.getppid()).create_time()), timezone.utc)


def _main_process_first():
    """Under ``accelerate launch``, the main process writes the dataset before the others reuse it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext()
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).main_process_first()


def _unfinished_build(name: str) -> Path | None:
    """The name's latest build folder if it stopped before the end, else None."""
    folder = home() / "builds" / name
    runs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return runs[-1] if runs and not (runs[-1] / "FINISHED").exists() else None


def _dataset_hash(build_dir: Path) -> str | None:
    card = build_dir / "data" / "dataset_card.json"
    return json.loads(card.read_text())["hash"] if card.is_file() else None
