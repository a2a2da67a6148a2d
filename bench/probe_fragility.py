"""Benchmark: how much of the forgetting-probe drop any change of the adapter's size would cost.

Asks the forgetting probe of base + a trained LoRA adapter three ways: as trained; with every layer's
adapter replaced by a random one of the same Frobenius norm (``B A`` scaled to match, per layer); and
with the trained adapter at half strength. If a random adapter of the same size costs most of the
drop, the drop comes from how far the weights move, not from what the adapter learned.

    python bench/probe_fragility.py --registry-entry $AGENTPEFT_HOME/registry/support-bot/1
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def probe_accuracy(base: Path, adapter: Path, mode: str, seed: int = 0) -> float:
    import torch

    from agentpeft.models import load_tokenizer, load_tuned
    from agentpeft.pipeline.evaluate import chat_rows, forgetting_probe, score_model

    model = load_tuned(base, adapter, merge=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if "default" not in getattr(module, "lora_A", {}):
                continue
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            if mode == "random":
                norm = (b @ a).norm()
                a2, b2 = torch.randn(a.shape, generator=generator), torch.randn(b.shape, generator=generator)
                scale = (norm / (b2 @ a2).norm()).sqrt()
                a.copy_(a2 * scale)
                b.copy_(b2 * scale)
            elif mode == "half":
                b.mul_(0.5)
    figures, _ = score_model(model.merge_and_unload(), load_tokenizer(base), chat_rows(forgetting_probe(), None),
                             ["accuracy"], 32)
    return figures["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--registry-entry", required=True, help="a registry version folder (manifest.json, adapter/)")
    parser.add_argument("--out", default=str(RESULTS / "probe_fragility.json"))
    args = parser.parse_args()
    entry = Path(args.registry_entry)
    manifest = json.loads((entry / "manifest.json").read_text())
    base = Path(manifest["base_model"]["path"])
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model": f"{manifest['name']}@{manifest['version']}",
              "probe_base_accuracy": (manifest["metrics"].get("forgetting") or {}).get("base_accuracy"),
              "probe_accuracy": {mode: probe_accuracy(base, entry / "adapter", mode)
                                 for mode in ("trained", "random", "half")}}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
