"""A self-contained HTML report of a registered model: dataset, training, base vs tuned, answers."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from . import registry


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"><figcaption>{alt}</figcaption></figure>'


def _table(headers: list[str], rows: list[list], cls: str) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render(ref: str) -> str:
    """The report of a registered version as one HTML string (images embedded)."""
    entry, m = registry.resolve(ref), registry.show(ref)
    ev = json.loads((entry / "eval.json").read_text())
    metrics = m["metrics"]
    comparison = [[k, f"{metrics['base'][k]:.3f}", f"{metrics['tuned'][k]:.3f}",
                   f"{metrics['tuned'][k] - metrics['base'][k]:+.3f}"] for k in metrics["tuned"]]
    f = metrics.get("forgetting")
    if f:
        comparison.append([f"forgetting probe accuracy ({f['n']} questions)", f"{f['base_accuracy']:.3f}",
                           f"{f['tuned_accuracy']:.3f}", f"{-f['accuracy_drop']:+.3f}"])
    d = m["dataset"]
    dataset = [["facts", d["facts"]], ["train pairs", d["splits"]["train"]], ["held-out pairs", d["splits"]["eval"]],
               ["tokens per pair (mean / max)", f"{d['mean_tokens']} / {d['max_tokens']}"],
               ["pairs per generator", ", ".join(f"{k}: {v}" for k, v in d["per_generator"].items())],
               ["split", d["split_method"]]]
    t = m["train"]
    training = [["method", t["config"]["method"]], ["steps", t["steps"]], ["final loss", "untrained" if t["final_loss"] is None else f"{t['final_loss']:.4f}"],
                ["seconds", t["seconds"]], ["trainable parameters", f"{t['trainable_params']:,} of {t['all_params']:,}"]]
    answers = [[e["question"], e["reference"], e["base"], e["tuned"]] for e in ev["examples"]]
    title = f"{m['name']}@{m['version']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>agentpeft report: {html.escape(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222}}
table{{border-collapse:collapse;margin:1rem 0;width:100%}}th,td{{border:1px solid #ccc;padding:.35rem .5rem;
text-align:left;vertical-align:top;font-size:.9rem}}th{{background:#f3f3f3}}figure{{display:inline-block;margin:0 1rem 1rem 0}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(m.get('description', ''))} Recipe <code>{html.escape(m['recipe'])}</code>, base model
<code>{html.escape(m['base_model']['name'])}</code>, built {html.escape(m['created'])} with agentpeft {html.escape(m['agentpeft_version'])}.</p>
<h2>Base vs tuned</h2>
{_table(["metric", "base", "tuned", "change"], comparison, "comparison")}
{_img(entry / "metrics.png", "Base vs tuned per metric")}{_img(entry / "loss_curve.png", "Training loss")}
<h2>Dataset</h2>
{_table(["", ""], dataset, "dataset")}
<h2>Training</h2>
{_table(["", ""], training, "training")}
<h2>Held-out questions</h2>
{_table(["question", "reference", "base model", "tuned model"], answers, "answers")}
</body></html>
"""


def write_report(ref: str, path: str | Path | None = None) -> Path:
    """Write ``report.html`` (into the registry entry unless ``path`` is given) and return its path."""
    target = Path(path) if path else registry.resolve(ref) / "report.html"
    target.write_text(render(ref), encoding="utf-8")
    return target
