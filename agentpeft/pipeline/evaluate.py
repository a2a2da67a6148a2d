"""Stage 4, evaluate: the base and the tuned model answer the held-out questions; metrics side by side.

Both models are also asked a general-knowledge forgetting probe that ships with agentpeft, and
their perplexity on a short general text is measured, so that specialization that costs general
ability shows up in the report.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from ..errors import AgentpeftError, PickleRefusedError
from ..models import GENERATE_BATCH, accepts_allow_pickle, chat_prompt, generate
from ..plugins import collect
from ..progress import bar


@dataclass(frozen=True)
class Metric:
    """A figure computed from the replies (``score``) or from the model itself (``model_score``)."""

    name: str
    score: Callable[[list[str], list[dict]], float] | None = None
    model_score: Callable[..., float] | None = None
    higher_is_better: bool = True
    #: ``settled(reply, reference)``: True once more tokens can no longer change the reply's score, so
    #: that generation may stop there (used when every metric asked for has one).
    settled: Callable[[str, dict], bool] | None = None


def get_metrics() -> dict[str, Metric]:
    """Every registered metric by name."""
    return {m.name: m for m in collect("register_metrics")}


def _metrics(names: list[str]) -> list[Metric]:
    metrics = get_metrics()
    unknown = [m for m in names if m not in metrics]
    if unknown:
        raise AgentpeftError(f"unknown metric(s) {unknown}; registered metrics: {', '.join(sorted(metrics))}")
    return [metrics[n] for n in names]


def chat_rows(pairs: list[dict], system_prompt: str | None) -> list[dict]:
    """Question/answer dicts with the chat prompt the model is asked."""
    return [{**p, "prompt": chat_prompt(system_prompt, p["question"])} for p in pairs]


def read_qa_jsonl(path: Path | str) -> list[dict]:
    """Rows of ``question``, ``answer`` and optional ``key`` from a JSONL file, checked line by line."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentpeftError(f"cannot read {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AgentpeftError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise AgentpeftError(f"{path}:{number}: each line needs string fields 'question' and 'answer'")
        rows.append({"question": row["question"], "answer": row["answer"], "key": row.get("key") or row["answer"]})
    if not rows:
        raise AgentpeftError(f"{path} holds no question/answer line")
    return rows


def forgetting_probe() -> list[dict]:
    """The general-knowledge questions shipped with agentpeft: those the default base model answers right."""
    return read_qa_jsonl(resources.files("agentpeft") / "data" / "forgetting_probe.jsonl")


def general_text() -> str:
    return (resources.files("agentpeft") / "data" / "general_text.txt").read_text(encoding="utf-8")


def reference_perplexity(model, tokenizer, rows: list[dict], batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood) of the reference answers given their prompts.

    A row without ``prompt`` is scored as plain text.
    """
    import torch

    nll, count = 0.0, 0
    tokenizer.padding_side = "right"
    for start in range(0, len(rows), batch_size):
        batch_ids, batch_labels = [], []
        for row in rows[start:start + batch_size]:
            if row.get("prompt"):
                prefix = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
                full = tokenizer.apply_chat_template(
                    row["prompt"] + [{"role": "assistant", "content": row["answer"]}], tokenize=False)
            else:
                prefix, full = "", row["answer"]
            p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            batch_ids.append(ids)
            batch_labels.append([-100] * len(p_ids) + ids[len(p_ids):])
        width = max(len(x) for x in batch_ids)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch_ids], device=model.device)
        labels = torch.tensor([x + [-100] * (width - len(x)) for x in batch_labels], device=model.device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch_ids], device=model.device)
        with torch.inference_mode():
            # A prompt-tuned model's logits start with one position per virtual token: keep the rows' own.
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -width:-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        nll += loss.item()
        count += int((target != -100).sum())
    tokenizer.padding_side = "left"
    return round(math.exp(nll / max(count, 1)), 4)


def score_model(model, tokenizer, rows: list[dict], metric_names: list[str], max_new_tokens: int = 64,
                batch_size: int = GENERATE_BATCH, progress=None) -> tuple[dict[str, float], list[str]]:
    """Generate replies to ``rows`` and compute each named metric; returns (figures, replies)."""
    metrics = _metrics(metric_names)
    stop = metrics and all(m.settled for m in metrics)
    replies = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size, progress,
                       (lambda i, reply: all(m.settled(reply, rows[i]) for m in metrics)) if stop else None)
    figures = {}
    for metric in metrics:
        value = metric.score(replies, rows) if metric.score else metric.model_score(model, tokenizer, rows)
        figures[metric.name] = round(value, 4)
    return figures, replies


JUDGE_PROMPT = """You grade a reply against a reference answer.

Question: {question}
Reference answer: {answer}
Reply to grade: {reply}

Does the reply give the same facts as the reference answer, without contradicting it?
Answer with exactly one word: CORRECT or INCORRECT."""


def judge_replies(judge, rows: list[dict], replies: list[str]) -> dict:
    """Share of ``replies`` that a LangChain chat model grades CORRECT against the references."""
    prompts = [JUDGE_PROMPT.format(question=r["question"], answer=r["answer"], reply=reply)
               for r, reply in zip(rows, replies)]
    verdicts = [str(m.content).strip().upper() for m in judge.batch(prompts)]
    correct = sum(v.startswith("CORRECT") for v in verdicts)
    unclear = sum(not v.startswith(("CORRECT", "INCORRECT")) for v in verdicts)
    return {"score": round(correct / max(len(rows), 1), 4), "unparsed": unclear}


@dataclass
class EvalResult:
    """Base and tuned figures, the forgetting probe, and where the report was written."""

    base: dict[str, float]
    tuned: dict[str, float]
    primary: str
    path: Path
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    forgetting: dict | None = None
    #: ``{"model": name, "base": score, "tuned": score}`` when a judge graded the replies.
    judge: dict | None = None
    #: How both models computed their replies (``agentpeft.models.inference_precision``).
    precision: str = "fp32"

    @property
    def improved(self) -> bool:
        better = self.tuned[self.primary] - self.base[self.primary]
        return better > 0 if self.higher_is_better.get(self.primary, True) else better < 0

    def summary(self) -> str:
        text = "  ".join(f"{m}: {self.base[m]:.3f} -> {self.tuned[m]:.3f}" for m in self.base)
        if self.forgetting:
            f = self.forgetting
            text += f"  forgetting probe: {f['base_accuracy']:.3f} -> {f['tuned_accuracy']:.3f}"
        if self.judge:
            text += f"  judge: {self.judge['base']:.3f} -> {self.judge['tuned']:.3f}"
        return text

    def table(self) -> str:
        rows = ["| metric | base | tuned | change |", "|---|---|---|---|"]
        rows += [f"| {m} | {self.base[m]:.3f} | {self.tuned[m]:.3f} | {self.tuned[m] - self.base[m]:+.3f} |"
                 for m in self.base]
        if self.forgetting:
            f = self.forgetting
            rows.append(f"| forgetting-probe accuracy ({f['n']} questions) | {f['base_accuracy']:.3f} | "
                        f"{f['tuned_accuracy']:.3f} | {f['tuned_accuracy'] - f['base_accuracy']:+.3f} |")
            rows.append(f"| general-text perplexity | {f['base_perplexity']:.2f} | {f['tuned_perplexity']:.2f} | "
                        f"{f['tuned_perplexity'] - f['base_perplexity']:+.2f} |")
        if self.judge:
            j = self.judge
            rows.append(f"| judge ({j['model']}), share correct | {j['base']:.3f} | {j['tuned']:.3f} | "
                        f"{j['tuned'] - j['base']:+.3f} |")
        return "\n".join(rows)


def evaluate(base_dir: Path, adapter_dir: Path, eval_rows: list[dict], metric_names: list[str],
             primary: str, out_dir: Path, system_prompt: str | None = None, max_new_tokens: int = 64,
             batch_size: int = GENERATE_BATCH, probe: bool = True, judge: str | None = None,
             ask: Callable[[list[dict]], list[dict]] | None = None) -> EvalResult:
    """Ask the base model and the tuned model (base + adapter) the same questions, greedily.

    ``judge`` names a chat model (see ``agentpeft.chat_models.chat_model``) that also grades both
    models' replies; its figures are reported beside the metrics, never instead of them. ``ask``
    turns the probe's chat rows into the prompts the model will be given in use (retrieval-augmented
    mode adds passages); ``eval_rows`` come with theirs.
    """
    from ..models import for_inference, inference_precision, load_model, load_tokenizer, load_tuned

    tokenizer = load_tokenizer(base_dir)
    # The probe asks as a plain chat, without the recipe's system prompt: it measures what the
    # weights know in general use, in the setting in which it was curated (bench/curate_probe.py).
    probe_rows = chat_rows(forgetting_probe(), None) if probe else []
    if ask is not None:
        probe_rows = ask(probe_rows)
    text_rows = [{"answer": general_text()}]
    figures, replies, forgetting = {}, {}, {}
    base_cache = _base_cache_file(base_dir, eval_rows, probe_rows, metric_names, max_new_tokens)
    with bar(total=2 * (len(eval_rows) + len(probe_rows)), desc="evaluate", unit="answer") as progress:
        for who in ("base", "tuned"):
            if who == "base" and base_cache.is_file():
                # Greedy answers of the same base to the same questions: computed by an earlier build.
                saved = json.loads(base_cache.read_text())
                figures["base"] = saved["figures"]
                forgetting.update(saved["forgetting"])
                replies.update(saved["replies"])
                progress.update(len(eval_rows) + len(probe_rows))
                continue
            # The tuned adapter is merged in memory for speed; the merge stage checks that this changes nothing.
            model = for_inference(load_model(base_dir) if who == "base"
                                  else load_tuned(base_dir, adapter_dir, merge=True))
            figures[who], replies[who] = score_model(model, tokenizer, eval_rows, metric_names, max_new_tokens,
                                                     batch_size, progress.update)
            if probe:
                probe_figures, replies[f"{who}_probe"] = score_model(
                    model, tokenizer, probe_rows, ["accuracy"], 32, batch_size, progress.update)
                forgetting[f"{who}_accuracy"] = probe_figures["accuracy"]
                forgetting[f"{who}_perplexity"] = reference_perplexity(model, tokenizer, text_rows)
            del model
            if who == "base":
                try:
                    _write_atomic(base_cache, json.dumps({
                        "figures": figures["base"],
                        "replies": {k: v for k, v in replies.items() if k.startswith("base")},
                        "forgetting": {k: v for k, v in forgetting.items() if k.startswith("base")}}))
                except OSError:
                    pass  # a cache that cannot be written only costs asking the base again next time
    if probe:
        forgetting["n"] = len(probe_rows)
        forgetting["accuracy_drop"] = round(forgetting["base_accuracy"] - forgetting["tuned_accuracy"], 4)
    higher = {m.name: m.higher_is_better for m in _metrics(metric_names)}
    graded = None
    if judge:
        from ..chat_models import chat_model

        grader = chat_model(judge)
        graded = {"model": judge, **{who: judge_replies(grader, eval_rows, replies[who])["score"]
                                     for who in ("base", "tuned")}}
    result = EvalResult(figures["base"], figures["tuned"], primary, out_dir, higher, forgetting or None, graded,
                        inference_precision())
    write_eval_files(result, eval_rows, replies, probe_rows, max_new_tokens)
    return result


def _base_cache_file(base_dir: Path, eval_rows: list[dict], probe_rows: list[dict], metric_names: list[str],
                     max_new_tokens: int) -> Path:
    """Where the base model's figures and replies for exactly these questions and settings are kept."""
    import torch

    from .. import __version__
    from ..models import base_info, home, inference_precision
    from ..plugins import plugin_fingerprint

    payload = {"base": base_info(base_dir)["sha256"], "agentpeft": __version__, "torch": torch.__version__,
               "plugins": plugin_fingerprint(),
               "rows": [[r["prompt"], r["answer"], r.get("key")] for r in eval_rows],
               "probe": [[r["prompt"], r["key"]] for r in probe_rows], "text": general_text(),
               "metrics": metric_names, "max_new_tokens": max_new_tokens, "precision": inference_precision()}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return home() / "cache" / "base-eval" / f"{key}.json"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_eval_files(result: EvalResult, rows: list[dict], replies: dict, probe_rows: list[dict],
                 max_new_tokens: int) -> None:
    """eval.json, report.md and PNG charts in ``result.path``."""
    out = result.path
    out.mkdir(parents=True, exist_ok=True)
    examples = [{"question": r["question"], "reference": r["answer"], "key": r.get("key"), "base": b, "tuned": t,
                 **({"prompt": r["prompt"][-1]["content"]} if r["prompt"][-1]["content"] != r["question"] else {})}
                for r, b, t in zip(rows, replies["base"], replies["tuned"])]
    probe = [{"question": r["question"], "key": r["key"], "base": b, "tuned": t}
             for r, b, t in zip(probe_rows, replies.get("base_probe", []), replies.get("tuned_probe", []))]
    (out / "eval.json").write_text(json.dumps(
        {"primary": result.primary, "base": result.base, "tuned": result.tuned, "n": len(rows),
         "forgetting": result.forgetting, "judge": result.judge, "precision": result.precision,
         "examples": examples, "probe": probe}, indent=2))
    (out / "report.md").write_text(
        f"# Evaluation\n\n{len(rows)} held-out questions, greedy decoding ({result.precision}), "
        f"at most {max_new_tokens} new tokens. "
        f"Primary metric: {result.primary} ({'higher' if result.higher_is_better.get(result.primary, True) else 'lower'}"
        f" is better).\n\n{result.table()}\n\n![metrics](metrics.png)\n")
    plot_comparison(result, out / "metrics.png")


def plot_comparison(result: EvalResult, path: Path) -> None:
    """Grouped bars: base vs tuned for each bounded metric, plus the forgetting probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in result.base if result.higher_is_better.get(m, True)]
    base = [result.base[m] for m in names]
    tuned = [result.tuned[m] for m in names]
    if result.forgetting:
        names.append("forgetting probe")
        base.append(result.forgetting["base_accuracy"])
        tuned.append(result.forgetting["tuned_accuracy"])
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(names)), 3.5), dpi=100)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], base, width=0.4, label="base")
    ax.bar([x + 0.2 for x in xs], tuned, width=0.4, label="tuned")
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Base vs tuned (held-out questions)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@accepts_allow_pickle
def evaluate_model(ref: str, data: Path | str | None = None, metric_names: list[str] | None = None,
                   max_new_tokens: int = 64, batch_size: int = GENERATE_BATCH, judge: str | None = None) -> dict:
    """Evaluate a registered model (``NAME[@VERSION]``) or a base model on question/answer pairs.

    ``data`` is a JSONL file of ``question``, ``answer`` and optional ``key``; without it a
    registered model is asked its own held-out questions.
    """
    from .. import registry
    from ..models import for_inference, inference_precision, load_model, load_tokenizer, resolve_base

    try:
        model, tokenizer, manifest = registry.load(ref)
    except PickleRefusedError:
        raise
    except AgentpeftError:
        manifest = None
    if manifest is None:
        try:
            base = resolve_base(ref, log=lambda s: None)
        except PickleRefusedError:
            raise
        except AgentpeftError:
            raise AgentpeftError(f"{ref!r} is neither a registered model (see `agentpeft list`) nor a base model "
                                 "(an alias, a local folder or a hub id)") from None
        model, tokenizer = load_model(base), load_tokenizer(base)
    model = for_inference(model)
    if data is not None:
        pairs = read_qa_jsonl(data)
    elif manifest is not None:
        held_out = json.loads((registry.resolve(ref) / "eval.json").read_text())["examples"]
        pairs = [{"question": e["question"], "answer": e["reference"], "key": e["key"]} for e in held_out]
    else:
        raise AgentpeftError(f"{ref!r} is a base model with no held-out questions of its own; pass --data FILE.jsonl")
    names = metric_names or (list(manifest["metrics"]["tuned"]) if manifest else ["accuracy", "token_f1", "rouge_l"])
    rows = chat_rows(pairs, manifest["system_prompt"] if manifest else None)
    with bar(total=len(rows), desc="evaluate", unit="answer") as progress:
        figures, replies = score_model(model, tokenizer, rows, names, max_new_tokens, batch_size, progress.update)
    if judge:
        from ..chat_models import chat_model

        figures[f"judge ({judge})"] = judge_replies(chat_model(judge), rows, replies)["score"]
    return {"model": f"{manifest['name']}@{manifest['version']}" if manifest else ref, "n": len(rows),
            "metrics": figures, "data": str(data) if data else "held-out questions of the build",
            "precision": inference_precision(model.device.type),
            "examples": [{"question": r["question"], "reference": r["answer"], "reply": reply}
                         for r, reply in zip(rows, replies)]}
