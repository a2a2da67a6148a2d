"""Stage 4, evaluate: the base and the tuned model answer the held-out questions; metrics side by side."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import AgentpeftError
from ..plugins import collect
from ..progress import bar


@dataclass(frozen=True)
class Metric:
    """A per-example score in [0, 1]; the reported figure is the mean."""

    name: str
    score: Callable[[list[str], list[dict]], list[float]]


def get_metrics() -> dict[str, Metric]:
    """Every registered metric by name."""
    return {m.name: m for m in collect("register_metrics")}


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64,
             batch_size: int = 16, progress=None) -> list[str]:
    """Greedy replies to chat prompts, generated in left-padded batches."""
    import torch

    tokenizer.padding_side = "left"
    replies: list[str] = []
    order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])))  # similar lengths pad less
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    out: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for i, row in zip(idx, gen[:, enc["input_ids"].shape[1]:]):
            out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        if progress:
            progress(len(idx))
    replies = [out[i] for i in range(len(prompts))]
    return replies


def score(predictions: list[str], references: list[dict], metric_names: list[str]) -> dict[str, float]:
    """Mean of each named metric over the examples."""
    metrics = get_metrics()
    unknown = [m for m in metric_names if m not in metrics]
    if unknown:
        raise AgentpeftError(f"unknown metric(s) {unknown}; registered metrics: {sorted(metrics)}")
    return {name: round(sum(s := metrics[name].score(predictions, references)) / max(len(s), 1), 4)
            for name in metric_names}


@dataclass
class EvalResult:
    """Base and tuned figures, and where the report was written."""

    base: dict[str, float]
    tuned: dict[str, float]
    primary: str
    path: Path

    @property
    def improved(self) -> bool:
        return self.tuned[self.primary] > self.base[self.primary]

    def summary(self) -> str:
        return "  ".join(f"{m}: base {self.base[m]:.3f} -> tuned {self.tuned[m]:.3f}" for m in self.base)

    def table(self) -> str:
        rows = [f"| metric | base | tuned | change |", "|---|---|---|---|"]
        rows += [f"| {m} | {self.base[m]:.3f} | {self.tuned[m]:.3f} | {self.tuned[m] - self.base[m]:+.3f} |"
                 for m in self.base]
        return "\n".join(rows)


def evaluate(base_dir: Path, adapter_dir: Path, eval_rows: list[dict], metric_names: list[str],
             primary: str, out_dir: Path, max_new_tokens: int = 64, batch_size: int = 16) -> EvalResult:
    """Ask the base model and the tuned model (dequantized base + adapter) the same questions, greedily."""
    from ..models import load_model, load_tokenizer, load_tuned

    tokenizer = load_tokenizer(base_dir)
    prompts = [row["prompt"] for row in eval_rows]
    answers = {}
    with bar(total=2 * len(prompts), desc="evaluate", unit="answer") as progress:
        answers["base"] = generate(load_model(base_dir), tokenizer, prompts, max_new_tokens, batch_size, progress.update)
        # Merged in memory for generation speed; the merge stage checks that merging changes nothing.
        tuned = load_tuned(base_dir, adapter_dir, merge=True)
        answers["tuned"] = generate(tuned, tokenizer, prompts, max_new_tokens, batch_size, progress.update)
    figures = {who: score(answers[who], eval_rows, metric_names) for who in ("base", "tuned")}
    out_dir.mkdir(parents=True, exist_ok=True)
    result = EvalResult(figures["base"], figures["tuned"], primary, out_dir)
    (out_dir / "eval.json").write_text(json.dumps(
        {"primary": primary, "base": result.base, "tuned": result.tuned, "n": len(eval_rows),
         "examples": [{"question": r["question"], "reference": r["answer"], "key": r["key"],
                       "base": b, "tuned": t} for r, b, t in zip(eval_rows, answers["base"], answers["tuned"])]},
        indent=2))
    (out_dir / "report.md").write_text(
        f"# Evaluation\n\n{len(eval_rows)} held-out questions, greedy decoding, "
        f"max {max_new_tokens} new tokens. Primary metric: {primary}.\n\n{result.table()}\n")
    return result
