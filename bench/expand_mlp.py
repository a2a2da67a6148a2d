"""Experiment: learn the knowledge base in new MLP neurons instead of a LoRA update of the existing weights.

LoRA changes every adapted layer linearly, so it acts on every input, general ones included; the
forgetting analysis (bench/probe_fragility.py) found that the MLP part of the default adapter carries
both its held-out accuracy and its forgetting. This script adds ``--neurons`` new SwiGLU neurons to each
layer's MLP (``down`` starting at zero, so training starts from the base) and trains only them, with the
recipe's data, trainer, hyperparameters and KL anchor on the general pairs (agentpeft's train stage,
with peft's get_peft_model swapped for this). A gated neuron can stay silent on inputs it does not key
on, which a linear update cannot (Transformer-Patcher, Huang et al., ICLR 2023, patches a model with
such neurons). The neurons fold into a standard checkpoint with a larger ``intermediate_size``; the
script checks that merged copy's logits.

    python bench/expand_mlp.py --registry-entry $AGENTPEFT_HOME/registry/support-bot/1 --dataset DIR
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def attach_neurons(model, count: int):
    """Add ``count`` trainable SwiGLU neurons to every decoder layer's MLP; freeze everything else."""
    import torch
    from torch import nn

    enabled = [True]
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in model.model.layers:
        mlp = layer.mlp
        hidden = mlp.gate_proj.in_features
        dtype = torch.float32
        mlp.new_gate = nn.Linear(hidden, count, bias=False, dtype=dtype)
        mlp.new_up = nn.Linear(hidden, count, bias=False, dtype=dtype)
        mlp.new_down = nn.Linear(count, hidden, bias=False, dtype=dtype)
        with torch.no_grad():
            # The new rows start at the scale of the layer's own gate and up rows; down at zero.
            for new, old in ((mlp.new_gate, mlp.gate_proj), (mlp.new_up, mlp.up_proj)):
                new.weight.normal_().mul_(old.weight.float().norm(dim=1).mean() / hidden ** 0.5)
            mlp.new_down.weight.zero_()

        def forward(x, _mlp=mlp, _base=mlp.forward):
            out = _base(x)
            if enabled[0]:
                # Computed in the new weights' dtype, as peft computes LoRA (bf16 where TRL keeps them so).
                h = x.to(_mlp.new_gate.weight.dtype)
                out = out + _mlp.new_down(_mlp.act_fn(_mlp.new_gate(h)) * _mlp.new_up(h)).to(out.dtype)
            return out

        mlp.forward = forward

    @contextmanager
    def disable_adapter():
        enabled[0] = False
        try:
            yield
        finally:
            enabled[0] = True

    model.disable_adapter = disable_adapter
    trainable = sum(p.numel() for n, p in model.named_parameters() if ".new_" in n)
    model.get_nb_trainable_parameters = lambda: (trainable, sum(p.numel() for p in model.parameters()))
    model.save_pretrained = lambda folder, **_: (Path(folder).mkdir(parents=True, exist_ok=True), torch.save(
        {n: p for n, p in model.state_dict().items() if ".new_" in n}, Path(folder) / "neurons.pt"))
    return model


def merged_copy(model):
    """A plain model of the same architecture with ``intermediate_size`` grown by the new neurons."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    count = model.model.layers[0].mlp.new_gate.out_features
    config = copy.deepcopy(model.config)
    config.intermediate_size += count
    merged = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in model.state_dict().items() if ".new_" not in k}
    for i, layer in enumerate(model.model.layers):
        mlp, p = layer.mlp, f"model.layers.{i}.mlp."
        state[p + "gate_proj.weight"] = torch.cat([mlp.gate_proj.weight, mlp.new_gate.weight])
        state[p + "up_proj.weight"] = torch.cat([mlp.up_proj.weight, mlp.new_up.weight])
        state[p + "down_proj.weight"] = torch.cat([mlp.down_proj.weight, mlp.new_down.weight], dim=1)
    merged.load_state_dict(state, strict=False)
    merged.tie_weights()
    return merged.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--registry-entry", required=True, help="the default build's registry folder (held-out questions)")
    parser.add_argument("--dataset", required=True, help="that build's dataset folder (cache/datasets/KEY/dataset)")
    parser.add_argument("--neurons", type=int, default=64, help="new neurons per layer")
    parser.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    parser.add_argument("--epochs", type=float, help="epochs (default: the recipe's)")
    parser.add_argument("--trained", type=Path, help="evaluate neurons.pt from an earlier run instead of training")
    parser.add_argument("--out", default=str(RESULTS / "expand_mlp.json"))
    args = parser.parse_args()

    import peft
    import torch

    from agentpeft.models import load_tokenizer
    from agentpeft.pipeline.evaluate import chat_rows, forgetting_probe, score_model
    from agentpeft.pipeline.train import train
    from agentpeft.default_plugins.metrics import answer_accuracy
    from agentpeft.recipe import get_recipe

    entry = Path(args.registry_entry)
    manifest = json.loads((entry / "manifest.json").read_text())
    base = Path(manifest["base_model"]["path"])
    recipe = get_recipe("support-bot")
    cfg = recipe.train.model_copy(update={"dequantize_once": True, **({"lr": args.lr} if args.lr else {}),
                                          **({"epochs": args.epochs} if args.epochs else {})})
    held: list = []
    peft.get_peft_model = lambda model, _config: held.append(attach_neurons(model, args.neurons)) or held[-1]
    out_dir = Path(args.out).with_suffix(".build")
    start = time.perf_counter()
    if args.trained:
        from agentpeft.models import load_model

        model = attach_neurons(load_model(base, dequantized=True), args.neurons)
        state = torch.load(args.trained)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        for name, param in model.named_parameters():
            if ".new_" in name:
                param.data = param.data.to(state[name].dtype)
        trained = {"steps": None, "final_loss": None, "trainable_params": sum(v.numel() for v in state.values())}
    else:
        result = train(base, Path(args.dataset), out_dir, cfg)
        model = held[-1]
        trained = {"steps": result.steps, "final_loss": result.final_loss, "trainable_params": result.trainable_params}
    seconds = time.perf_counter() - start
    model.eval()

    tokenizer = load_tokenizer(base)
    examples = json.loads((entry / "eval.json").read_text())["examples"]
    held_out = chat_rows([{"question": e["question"], "answer": e["reference"], "key": e["key"]} for e in examples],
                         manifest.get("system_prompt"))
    probe = chat_rows(forgetting_probe(), None)
    with torch.no_grad():
        probe_figures, probe_replies = score_model(model, tokenizer, probe, ["accuracy"], 32)
        held_figures, _ = score_model(model, tokenizer, held_out, ["accuracy"], 48)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "neurons_per_layer": args.neurons, **trained,
              "lr": cfg.lr, "epochs": cfg.epochs, "anchor_kl": cfg.anchor_kl,
              "train_seconds": None if args.trained else round(seconds, 1),
              "held_out_accuracy": held_figures["accuracy"], "probe_accuracy": probe_figures["accuracy"],
              "probe_questions": len(probe),
              "probe_wrong": [{"question": r["question"], "key": r["key"], "reply": reply}
                              for r, reply in zip(probe, probe_replies) if not answer_accuracy([reply], [r])]}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
             for r in (held_out[0], probe[0])]
    ids = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        result["merged_max_logit_diff"] = (merged_copy(model)(**ids).logits - model(**ids).logits).abs().max().item()
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
