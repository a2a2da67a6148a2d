"""Benchmark: agentpeft's train stage against a plain Hugging Face QLoRA script, alternately, plus MFU.

Both sides train the same model (SmolLM2-135M-Instruct by default) on the support-bot dataset built by
agentpeft's dataset stage, for the same steps with the same hyperparameters: LoRA r=16, alpha=32,
dropout 0.05 on q_proj and v_proj over a 4-bit NF4 double-quantized base, batch 8, AdamW, cosine schedule
with warm-up, gradient clipping 1.0, seed 42. The baseline is written the way the Hugging Face docs write
it: ``transformers.Trainer``, ``prepare_model_for_kbit_training`` (which turns gradient checkpointing on),
the chat-rendered ``text`` column tokenized up front, ``DataCollatorForLanguageModeling`` padding each
batch to its longest row. Its 4-bit compute dtype is the one agentpeft picks for the hardware (fp32 on a
CPU without native bf16), so the ratio measures the trainers, not the dtype.

Runs go A B A B ... in child processes (one process per run, so memory and threads start clean), each
counting the non-padding tokens and the answer tokens (those after an ``assistant`` header) of every
training batch it processes. After training, each run's adapter is scored with the same function: the
mean cross-entropy over the answer tokens of the first 96 train rows (the "answer loss"), so the losses
compare even though the baseline trains on every token.

MFU: the script times large ``torch.matmul``s in fp32 and bf16 for the machine's peak, and counts model
FLOPs per token as ``2N`` forward + ``2N`` backward (input gradients through the frozen base) +
``6 N_adapter`` (forward, input and weight gradients of the adapters), where ``N`` is the number of weights
used in matmuls (every linear layer, lm_head included); full fine-tuning is the usual ``6N``. Recomputation
by gradient checkpointing is not counted (model FLOPs, not hardware FLOPs); attention's ``L^2`` term is
left out (sequences here are under 200 tokens, where it is below 2% of the total). Those model FLOPs are
counted per row for every side, as the baseline computes them. agentpeft's runs also report
``executed_flops`` and ``mfu_bf16_executed``: the same products over the work its train stage cannot skip,
the trunk on each shared prompt prefix once per batch and the LM head on the answer positions only.
``layer_matmul_gflops`` times one decoder layer's own matmuls (forward and input-gradient products) at
the rows a step feeds them (tokens per step, with and without the shared prefix counted once): the rate
matmuls of this model's sizes reach here, set against the square-matmul peak.

    OMP_NUM_THREADS=2 python bench/train_throughput.py --steps 20 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
HYPER = {"method": "qlora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
         "batch_size": 8, "lr": 2e-3, "warmup_ratio": 0.1, "max_grad_norm": 1.0, "seed": 42}
#: Rows of the train split scored for the answer loss.
EVAL_ROWS = 96


def build_data(base: Path, out: Path, max_seq_len: int = 256) -> Path:
    """The support-bot dataset, built by agentpeft's dataset stage (pairs of at most ``max_seq_len`` tokens)."""
    from agentpeft.models import load_tokenizer
    from agentpeft.pipeline.dataset import build_dataset
    from agentpeft.pipeline.ingest import ingest
    from agentpeft.recipe import configure

    recipe = configure("support-bot")
    return build_dataset(ingest(recipe.kb_path), [*recipe.data.generators, "general"], load_tokenizer(base),
                         recipe.system_prompt, out, train_phrasings=recipe.data.train_phrasings,
                         max_seq_len=max_seq_len).path


class TokenCounter:
    """Counts the non-padding and answer tokens of every training batch (padded or packed), and the
    tokens left when the prompt prefix that rows of a batch share is counted once (``unique``)."""

    def __init__(self, tokenizer):
        self.start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]
        self.tokens = self.answer = self.unique = self.steps = 0
        self.batch_shapes: list[list[int]] = []

    def __call__(self, inputs: dict) -> None:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        self.steps += 1
        self.batch_shapes.append(list(ids.shape))
        rows = ids.tolist()
        masks = mask.tolist() if mask is not None else [[1] * len(r) for r in rows]
        for row, m in zip(rows, masks):
            real = [t for t, keep in zip(row, m) if keep]
            self.tokens += len(real)
            self.unique += len(real)
            self.answer += self._answer_tokens(real)
        if mask is not None:
            from agentpeft.pipeline.shared_prefix import prefix_groups

            self.unique -= sum((len(rows) - 1) * shared for rows, shared in prefix_groups(ids, mask))

    def _answer_tokens(self, row: list[int]) -> int:
        count, inside, k, h = 0, False, 0, len(self.header)
        while k < len(row):
            if row[k] == self.start_id:
                inside = row[k + 1:k + 1 + h] == self.header
                k += 1 + (h if inside else 0)
                continue
            count += inside
            k += 1
        return count


def count_training_batches(counter: TokenCounter) -> None:
    """Route every ``Trainer.training_step`` through ``counter`` (both trainers inherit it)."""
    import transformers

    real = transformers.Trainer.training_step

    def step(self, model, inputs, *args, **kwargs):
        counter(inputs)
        return real(self, model, inputs, *args, **kwargs)

    transformers.Trainer.training_step = step


def run_agentpeft(base: Path, data: Path, work: Path, steps: int, overrides: dict) -> tuple[Path, float, float]:
    from agentpeft.pipeline.train import train
    from agentpeft.recipe import configure

    cfg = configure("support-bot", max_steps=steps, **{**HYPER, **overrides}).train
    result = train(base, data, work, cfg, log=lambda s: None)
    return result.adapter_dir, result.seconds, result.final_loss


def run_baseline(base: Path, data: Path, work: Path, steps: int) -> tuple[Path, float, float]:
    """The Hugging Face docs' QLoRA recipe."""
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForLanguageModeling,
                              Trainer, TrainingArguments)

    from agentpeft.models import bf16_supported

    torch.manual_seed(HYPER["seed"])
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16 if bf16_supported() else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=bnb, device_map="cpu"
                                                 if not torch.cuda.is_available() else "auto")
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=HYPER["r"], lora_alpha=HYPER["alpha"], lora_dropout=HYPER["dropout"],
                                             target_modules=HYPER["target_modules"], bias="none",
                                             task_type="CAUSAL_LM"))
    train_set = load_from_disk(str(data))["train"]
    train_set = train_set.map(lambda b: tokenizer(b["text"], truncation=True, max_length=256), batched=True,
                              remove_columns=train_set.column_names)
    args = TrainingArguments(
        output_dir=str(work / "out"), max_steps=steps, per_device_train_batch_size=HYPER["batch_size"],
        learning_rate=HYPER["lr"], lr_scheduler_type="cosine", warmup_steps=max(1, round(HYPER["warmup_ratio"] * steps)),
        max_grad_norm=HYPER["max_grad_norm"], weight_decay=0.0, logging_steps=1, save_strategy="no",
        report_to="none", seed=HYPER["seed"], use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_set,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.save_pretrained(str(work / "adapter"))
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return work / "adapter", seconds, losses[-1]


def answer_loss(base: Path, adapter: Path, data: Path) -> float:
    """Mean cross-entropy over the answer tokens of the first train rows, the adapter on its 4-bit base."""
    import torch
    from datasets import load_from_disk
    from peft import PeftModel

    from agentpeft.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(base)
    model = PeftModel.from_pretrained(load_model(base, quantized=True), str(adapter)).eval()
    rows = load_from_disk(str(data))["train"].select(range(min(EVAL_ROWS, len(load_from_disk(str(data))["train"]))))
    total, n = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
            labels = [-100] * len(p_ids) + ids[len(p_ids):]
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            k = sum(1 for t in labels[1:] if t != -100)
            total += out.loss.item() * k
            n += k
    return total / n


def matmul_flops(model) -> tuple[int, int]:
    """Weights used in matmuls (every linear layer, lm_head included) and the trainable ones among them."""
    import torch

    n = adapters = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            size = w.numel() * (2 if w.dtype == torch.uint8 else 1)  # 4-bit weights pack two per byte
            n += size
            adapters += size if w.requires_grad else 0
    return n - adapters, adapters


def peak_memory_gib() -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak resident set."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def child(side: str, base: Path, data: Path, steps: int, overrides: dict, evaluate: bool = True) -> dict:
    import torch
    from transformers import AutoConfig

    from agentpeft.models import load_tokenizer
    from agentpeft.plan import meta_model

    counter = TokenCounter(load_tokenizer(base))
    count_training_batches(counter)
    with tempfile.TemporaryDirectory() as tmp:
        if side.startswith("agentpeft"):
            adapter, seconds, logged = run_agentpeft(base, data, Path(tmp), steps, overrides)
        else:
            adapter, seconds, logged = run_baseline(base, data, Path(tmp), steps)
        peak = peak_memory_gib()
        loss = round(answer_loss(base, adapter, data), 4) if evaluate else None
    model = meta_model(AutoConfig.from_pretrained(str(base)), "lora", HYPER["r"], HYPER["alpha"],
                       HYPER["target_modules"])
    frozen, adapters = matmul_flops(model)
    flops = counter.tokens * (4 * frozen + 6 * adapters)
    executed = None
    if side.startswith("agentpeft"):
        # The work the train stage cannot skip: the trunk on each shared prefix once (when it shares them),
        # the LM head on the answer positions only; padding and gradient-checkpointing recomputation not counted.
        from agentpeft.pipeline.train import shares_prefix
        from agentpeft.recipe import configure

        trunk_tokens = counter.unique if shares_prefix(configure("support-bot", **{**HYPER, **overrides}).train) \
            else counter.tokens
        head = model.get_output_embeddings().weight.numel()
        executed = trunk_tokens * (4 * (frozen - head) + 6 * adapters) + counter.answer * 4 * head
    return {"side": side, "steps": counter.steps, "seconds": round(seconds, 2), "tokens": counter.tokens,
            "answer_tokens": counter.answer, "unique_tokens": counter.unique,
            "tokens_per_second": round(counter.tokens / seconds, 1),
            "answer_tokens_per_second": round(counter.answer / seconds, 1), "logged_final_loss": round(logged, 4),
            "answer_loss": loss, "peak_memory_gib": round(peak, 3), "model_flops": flops, "flops_per_second": flops / seconds,
            "executed_flops": executed, "executed_flops_per_second": executed / seconds if executed else None,
            "threads": torch.get_num_threads(), "batch_shapes": counter.batch_shapes}


def _device():
    """The GPU when there is one, else the CPU, and how to wait for its work to finish."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.synchronize
    return "cpu", lambda: None


def _best_seconds(product, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``product`` after one warm-up call."""
    _, sync = _device()
    product()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(dtype_name: str, size: int = 2048, repeats: int = 10) -> float:
    """Best of ``repeats`` timed ``size``-square matmuls (on the GPU when there is one), in FLOP/s."""
    import torch

    device, _ = _device()
    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype_name), device=device) for _ in range(2))
    return 2 * size**3 / _best_seconds(lambda: torch.matmul(a, b), repeats)


def layer_shape_rate(base: Path, dtype_name: str, rows: int, repeats: int = 5) -> float:
    """FLOP/s of one decoder layer's own matmuls at ``rows`` tokens: each linear layer's forward product and
    its input-gradient product (what a step runs through the frozen base), best of ``repeats`` each. Set
    beside the square-matmul peak, it says how much of that peak matmuls of this model's sizes can reach."""
    import torch
    from transformers import AutoConfig

    from agentpeft.plan import meta_model

    model = meta_model(AutoConfig.from_pretrained(str(base)), "full")
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))[0]
    device, _ = _device()
    dtype = getattr(torch, dtype_name)
    flops = seconds = 0.0
    for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
        w = torch.randn(linear.out_features, linear.in_features, dtype=dtype, device=device)
        x, dy = (torch.randn(rows, n, dtype=dtype, device=device) for n in (linear.in_features, linear.out_features))
        for product in (lambda: torch.nn.functional.linear(x, w), lambda: dy @ w):
            flops, seconds = flops + 2 * rows * w.numel(), seconds + _best_seconds(product, repeats)
    return flops / seconds


def benchmark(base: Path, data: Path, steps: int, rounds: int, overrides: dict, evaluate: bool = True,
              matmul_size: int = 2048, variants: dict[str, dict] | None = None) -> dict:
    """Alternate agentpeft and baseline runs (A B A B ...) in child processes; medians and ratios.

    ``variants`` adds agentpeft runs with extra TrainConfig overrides (side ``agentpeft+NAME``), run in
    the same rotation, for before/after comparisons of a change.
    """
    peaks = {name: matmul_peak(name, matmul_size) for name in ("float32", "bfloat16")}
    variants = variants or {}
    sides = {"agentpeft": overrides, **{f"agentpeft+{k}": {**overrides, **v} for k, v in variants.items()},
             "baseline": {}}
    runs = []
    for _ in range(rounds):
        for side, side_overrides in sides.items():
            cmd = [sys.executable, __file__, "--child", side, "--data", str(data), "--base", str(base),
                   "--steps", str(steps), "--agentpeft", json.dumps(side_overrides)] + ([] if evaluate else ["--no-eval"])
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{side} run failed:\n{(proc.stderr or proc.stdout)[-3000:]}")
            runs.append(json.loads(lines[-1][7:]))
            print({k: v for k, v in runs[-1].items() if k != "batch_shapes"}, flush=True)
    summary = {}
    for side in sides:
        mine = [r for r in runs if r["side"] == side]
        fps = statistics.median(r["flops_per_second"] for r in mine)
        summary[side] = {
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in mine),
            "answer_tokens_per_second": statistics.median(r["answer_tokens_per_second"] for r in mine),
            "answer_loss": statistics.median(r["answer_loss"] for r in mine) if evaluate else None,
            "peak_memory_gib": max(r["peak_memory_gib"] for r in mine),
            "mfu_fp32": round(fps / peaks["float32"], 4), "mfu_bf16": round(fps / peaks["bfloat16"], 4)}
        if all(r.get("executed_flops_per_second") for r in mine):
            executed = statistics.median(r["executed_flops_per_second"] for r in mine)
            summary[side]["mfu_bf16_executed"] = round(executed / peaks["bfloat16"], 4)
    ours = [r for r in runs if r["side"] == "agentpeft"]
    rows = sorted({round(statistics.median(r[k] / r["steps"] for r in ours)) for k in ("tokens", "unique_tokens")})
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": str(base.name), "steps": steps,
        "hyperparameters": HYPER, "agentpeft_overrides": overrides,
        "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
        "layer_matmul_gflops": {str(n): {k: round(layer_shape_rate(base, k, n) / 1e9, 1) for k in peaks} for n in rows},
        "summary": summary,
        "ratio_tokens_per_second": round(summary["agentpeft"]["tokens_per_second"]
                                         / summary["baseline"]["tokens_per_second"], 3),
        "ratio_answer_tokens_per_second": round(summary["agentpeft"]["answer_tokens_per_second"]
                                                / summary["baseline"]["answer_tokens_per_second"], 3),
        "variant_ratios": {side: round(summary[side]["tokens_per_second"] / summary["baseline"]["tokens_per_second"], 3)
                           for side in sides if side.startswith("agentpeft+")},
        "runs": runs}


def child_main(args) -> None:
    """The child side of ``benchmark``: one training run, its figures on one RESULT line."""
    print("RESULT " + json.dumps(child(args.child, Path(args.base), Path(args.data), args.steps,
                                       json.loads(args.agentpeft), evaluate=not args.no_eval)))


def child_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="A/B pairs")
    parser.add_argument("--base", default=None, help="model folder (default: the smollm2-135m alias)")
    parser.add_argument("--agentpeft", default="{}", help="JSON TrainConfig overrides for the agentpeft side")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="also run agentpeft with these overrides, e.g. 'noshare={\"share_prefix\": false}'")
    parser.add_argument("--label", default="", help="recorded in the JSON (e.g. what changed)")
    parser.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    child_options(parser)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    from agentpeft.models import resolve_base

    base = Path(args.base) if args.base else resolve_base("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data(base, Path(tmp) / "data")
        variants = {v.split("=", 1)[0]: json.loads(v.split("=", 1)[1]) for v in args.variant}
        result = {"label": args.label, **benchmark(base, data, args.steps, args.rounds, json.loads(args.agentpeft),
                                                   variants=variants)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
