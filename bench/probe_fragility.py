"""Benchmark: how much of the forgetting-probe drop any change of the adapter's size would cost.

Asks the forgetting probe (and the build's held-out questions, from its eval.json) of base + a trained
LoRA adapter: as trained; with every layer's adapter replaced by a random one of the same Frobenius
norm (``B A`` scaled to match, per layer); and with the trained adapter scaled down (``--scales``,
as WiSE-FT-style interpolation toward the base does). If a random adapter of the same size costs most
of the drop, the drop comes from how far the weights move, not from what the adapter learned; the
scaled adapters trace how much held-out accuracy each probe point costs.

``--probe FILE`` asks another probe file (question, answer, key per line) instead of agentpeft's,
e.g. bench/data/forgetting_probe_v2_greedy_only.jsonl, the probe before curation also sampled.

    python bench/probe_fragility.py --registry-entry $AGENTPEFT_HOME/registry/support-bot/1
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def accuracies(base: Path, adapter: Path, held_out: list[dict], probe: list[dict], mode: str, scale: float = 1.0,
               seed: int = 0, components: slice = slice(None), keep: str = "") -> dict:
    import torch

    from agentpeft.models import load_tokenizer, load_tuned
    from agentpeft.pipeline.evaluate import score_model

    model = load_tuned(base, adapter, merge=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "default" not in getattr(module, "lora_A", {}):
                continue
            if keep and not _kept(name, keep):
                module.lora_B["default"].weight.zero_()
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            if mode == "random":
                norm = (b @ a).norm()
                a2, b2 = torch.randn(a.shape, generator=generator), torch.randn(b.shape, generator=generator)
                factor = (norm / (b2 @ a2).norm()).sqrt()
                a.copy_(a2 * factor)
                b.copy_(b2 * factor)
            elif mode == "svd":
                u, sv, vh = torch.linalg.svd(b.float() @ a.float(), full_matrices=False)
                keep = torch.zeros_like(sv)
                keep[components] = 1.0
                root = (sv * keep)[: a.shape[0]].sqrt()
                b.copy_(u[:, : a.shape[0]] * root)
                a.copy_(root[:, None] * vh[: a.shape[0]])
            b.mul_(scale)
    merged, tokenizer = model.merge_and_unload(), load_tokenizer(base)
    asked, _ = score_model(merged, tokenizer, probe, ["accuracy"], 32)
    held, _ = score_model(merged, tokenizer, held_out, ["accuracy"], 48)
    return {"probe": asked["accuracy"], "held_out": held["accuracy"]}


def _kept(name: str, keep: str) -> bool:
    """Whether LoRA module ``name`` is in ``keep``: '+'-joined module names and/or layer ranges ('q_proj+v_proj', 'layers0-14')."""
    parts = name.split(".")
    layer = next((int(parts[i + 1]) for i, p in enumerate(parts[:-1]) if p == "layers" and parts[i + 1].isdigit()), None)
    for item in keep.split("+"):
        if item.startswith("layers") and layer is not None:
            low, _, high = item[len("layers"):].partition("-")
            if int(low) <= layer <= int(high or low):
                return True
        elif item == parts[-1]:
            return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--registry-entry", required=True, help="a registry version folder (manifest.json, adapter/)")
    parser.add_argument("--scales", default="1.0,0.7,0.5", help="strengths of the trained adapter to ask")
    parser.add_argument("--probe", type=Path, help="a probe file to ask instead of agentpeft's forgetting probe")
    parser.add_argument("--random-seeds", type=int, default=1, help="random adapters to ask, one per seed")
    parser.add_argument("--svd", default="",
                        help="singular components of each layer's update to keep, as Python slices: ':4' (the top 4), '1:' (all "
                             "but the top one)")
    parser.add_argument("--keep", default="",
                        help="comma-separated sets of LoRA modules to keep (the others are switched off), each '+'-joined "
                             "module names or layer ranges: 'q_proj+k_proj+v_proj+o_proj,layers0-14'")
    parser.add_argument("--out", default=str(RESULTS / "probe_fragility.json"))
    args = parser.parse_args()

    from agentpeft.models import load_model, load_tokenizer
    from agentpeft.pipeline.evaluate import chat_rows, forgetting_probe, read_qa_jsonl, score_model

    entry = Path(args.registry_entry)
    manifest = json.loads((entry / "manifest.json").read_text())
    base = Path(manifest["base_model"]["path"])
    examples = json.loads((entry / "eval.json").read_text())["examples"]
    held_out = chat_rows([{"question": e["question"], "answer": e["reference"], "key": e["key"]} for e in examples],
                         manifest.get("system_prompt"))
    probe = chat_rows(read_qa_jsonl(args.probe) if args.probe else forgetting_probe(), None)
    base_probe, _ = score_model(load_model(base), load_tokenizer(base), probe, ["accuracy"], 32)
    adapter = entry / "adapter"
    rows = [{"adapter": f"trained x{s}", **accuracies(base, adapter, held_out, probe, "trained", float(s))}
            for s in filter(None, args.scales.split(","))]
    for spec in filter(None, args.svd.split(",")):
        start, _, stop = spec.partition(":")
        components = slice(int(start) if start else None, int(stop) if stop else None)
        rows.append({"adapter": f"trained, singular components [{spec}] of each layer's update",
                     **accuracies(base, adapter, held_out, probe, "svd", components=components)})
    for keep in filter(None, args.keep.split(",")):
        rows.append({"adapter": f"trained, only {keep}", **accuracies(base, adapter, held_out, probe, "trained", keep=keep)})
    rows += [{"adapter": f"random, same per-layer norm (seed {seed})",
              **accuracies(base, adapter, held_out, probe, "random", seed=seed)} for seed in range(args.random_seeds)]
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model": f"{manifest['name']}@{manifest['version']}",
              "probe": str(args.probe or "agentpeft/data/forgetting_probe.jsonl"), "probe_questions": len(probe),
              "probe_base_accuracy_now": base_probe["accuracy"],
              "probe_base_accuracy": (manifest["metrics"].get("forgetting") or {}).get("base_accuracy"),
              "held_out_base_accuracy": manifest["metrics"]["base"].get("accuracy"),
              "rows": rows}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
