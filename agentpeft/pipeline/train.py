"""Stage 3, train: a PEFT adapter (QLoRA by default) trained with TRL's SFTTrainer on the answer tokens.

``train`` runs the stage as named steps, in order: ``_setup_data``, ``_setup_tokenizer``, ``_setup_model``
(with ``_setup_precision``), ``_setup_schedule``, ``_training_args``, ``_setup_trainer``, ``_run_training``,
``_save``. The trainer and its loss are in ``trainer.py``, the shared-prefix forward in ``shared_prefix.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import models
from ..errors import AgentpeftError
from ..models import ADAPTER_META, dense_nf4_fits, device_name, load_model, load_tokenizer
from ..recipe import TrainConfig

#: Methods whose adapter can be folded into the base weights.
MERGEABLE = ("qlora", "lora", "dora")


@dataclass
class TrainResult:
    """The trained adapter and what it cost."""

    adapter_dir: Path
    steps: int
    final_loss: float | None
    seconds: float
    trainable_params: int
    all_params: int
    tokens: int
    precision: str = ""
    device: str = ""

    def summary(self) -> str:
        loss = "untrained" if self.final_loss is None else f"final loss {self.final_loss:.3f}"
        return (f"{self.steps} steps, {loss}, {self.seconds:.0f}s "
                f"({self.tokens / max(self.seconds, 1e-9):.0f} tokens/s), "
                f"{self.trainable_params:,} trainable params")


def peft_config(cfg: TrainConfig, system_prompt: str = ""):
    """The peft config of a method: LoRA (also for QLoRA), DoRA, prefix tuning or prompt tuning."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit

    if cfg.method in MERGEABLE:
        return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                          use_dora=cfg.method == "dora", task_type="CAUSAL_LM")
    if cfg.method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=cfg.virtual_tokens, task_type="CAUSAL_LM")
    return PromptTuningConfig(num_virtual_tokens=cfg.virtual_tokens, task_type="CAUSAL_LM",
                              prompt_tuning_init=PromptTuningInit.RANDOM)


def train(base_dir: Path, dataset_dir: Path, out_dir: Path, cfg: TrainConfig, resume: bool = False,
          log=print) -> TrainResult:
    """Train an adapter on the dataset's train split; save it to ``out_dir/adapter``.

    The steps, in order: check the loggers, seed, load the data, the tokenizer and the model with its
    adapter, plan the schedule, make the trainer, train, save.
    """
    import torch

    importlib.import_module(".trainer", __package__)  # TRL and peft load before the seed: no import draws from it
    _check_loggers(cfg.report_to)
    torch.manual_seed(cfg.seed)
    cfg, train_set = _setup_data(dataset_dir, cfg, log)
    tokenizer = _setup_tokenizer(base_dir)
    setup = _setup_model(base_dir, cfg, train_set, log)
    cfg, rotation, planned = _setup_schedule(cfg, train_set, log)
    args = _training_args(cfg, out_dir / "checkpoints", planned, setup.bf16)
    trainer = _setup_trainer(setup.model, args, train_set, tokenizer, cfg, rotation, log)
    seconds = _run_training(trainer, cfg, resume, log)
    return _save(trainer, setup, cfg, out_dir, seconds, log)


@dataclass
class ModelSetup:
    """The model being trained and how it holds and computes its weights."""

    model: Any  # the peft model
    quantized: bool  # qlora: the base is NF4
    dense: bool  # qlora on the NF4 weights dequantized once to fp32
    bf16: bool  # the trainer computes in bf16
    cast: bool  # the frozen linear layers were copied to bf16
    nf4_compute: Any  # bitsandbytes' compute dtype of a 4-bit base; None otherwise
    trainable: int
    total: int


def _check_loggers(report_to: list[str]) -> None:
    """Fail early when a logger the recipe reports to is not installed."""
    for logger in set(report_to) - {"none"}:
        if importlib.util.find_spec(logger) is None:
            raise AgentpeftError(f"--report-to {logger} needs the {logger} package; pip install {logger}")


def _setup_data(dataset_dir: Path, cfg: TrainConfig, log=print):
    """The dataset's train split, and ``cfg`` as it applies to the method.

    The KL anchor (``anchor_kl``) holds the train-only rows to the base model through the adapter switched
    off, which only the LoRA family has: other methods learn those rows by cross-entropy. With the anchor
    on, each train-only row carries its index (``trainer.with_train_only_index``).
    """
    from datasets import load_from_disk

    train_set = load_from_disk(str(dataset_dir))["train"]
    if cfg.anchor_kl and cfg.method not in MERGEABLE:
        log(f"anchor_kl applies to qlora, lora and dora: {cfg.method} learns the train-only pairs' answers by "
            "cross-entropy")
        cfg = cfg.model_copy(update={"anchor_kl": 0.0})
    if cfg.anchor_kl:
        if "train_only" not in train_set.column_names:
            raise AgentpeftError(f"{dataset_dir} predates anchor_kl (no train_only column); rebuild it with "
                                 "`agentpeft data`")
        from .trainer import with_train_only_index

        train_set = with_train_only_index(train_set)
    return cfg, train_set


def _setup_tokenizer(base_dir: Path):
    """The base's tokenizer, padding on the right (the answer-only loss and the shared-prefix forward expect it)."""
    tokenizer = load_tokenizer(base_dir)
    tokenizer.padding_side = "right"
    return tokenizer


def _setup_model(base_dir: Path, cfg: TrainConfig, train_set, log=print) -> ModelSetup:
    """The base model with the method's adapter: loaded (NF4, NF4 dequantized once, or fp32), prepared for
    training, wrapped by peft, then set up for its compute precision (``_setup_precision``)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    quantized = cfg.method == "qlora"
    dense = quantized and (dense_nf4_fits(base_dir) if cfg.dequantize_once is None else cfg.dequantize_once)
    if dense:
        log("qlora: training on the NF4 weights dequantized once to fp32 (dequantize_once)")
    model = load_model(base_dir, quantized=quantized and not dense, dequantized=dense)
    nf4_compute = getattr(getattr(model.config, "quantization_config", None), "bnb_4bit_compute_dtype", None)
    if quantized and not dense:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, peft_config(cfg))
    bf16, cast = _setup_precision(model, cfg, train_set, log)
    trainable, total = model.get_nb_trainable_parameters()
    log(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    return ModelSetup(model, quantized, dense, bf16, cast, nf4_compute, trainable, total)


def _setup_precision(model, cfg: TrainConfig, train_set, log=print) -> tuple[bool, bool]:
    """Whether the trainer computes in bf16 (``cfg.bf16``, else where the hardware has native bf16), and whether
    the frozen linear layers were copied to bf16 for it; on a CPU, short rows then attend as plain matmuls."""
    import torch

    native_bf16 = models.bf16_supported()
    bf16 = cfg.bf16 if cfg.bf16 is not None else native_bf16
    if bf16 and not native_bf16:
        log("bf16 on hardware without native bf16 is emulated, slower than fp32")
    cast = bf16 and models.frozen_linears_to_bf16(model)
    if cast:
        if not torch.cuda.is_available():
            models.bound_onednn_caches()
            longest = max(train_set["n_tokens"]) if "n_tokens" in train_set.column_names else cfg.max_seq_len
            if longest <= EAGER_MAX_TOKENS:
                models.eager_attention_on_cpu(model.get_base_model())
        log("bf16: the base's linear layers copied to bf16; the adapter and the logits stay fp32")
    return bf16, cast


def _setup_schedule(cfg: TrainConfig, train_set, log=print):
    """``cfg`` with long rows' batches split into micro-batches on a CPU (a GPU holds a batch of long rows
    easily), the phrasing rotation (``rotate_phrasings``; None when off) and the optimizer steps planned;
    the learning rate is logged where it is the method's default."""
    import torch

    if "n_tokens" in train_set.column_names and not torch.cuda.is_available():
        cfg = micro_batched(cfg, max(train_set["n_tokens"]), log)
    rotation = phrasing_rotation(train_set) if cfg.rotate_phrasings else None
    rows_per_epoch = len(train_set)
    if rotation:
        facts, train_only = rotation
        rows_per_epoch = len(facts) + len(train_only)
        log(f"rotate_phrasings: each epoch trains {rows_per_epoch} of the {len(train_set)} rows, one phrasing of each "
            f"of {len(facts)} facts in turn and the {len(train_only)} train-only pairs")
    if cfg.lr is None:
        log(f"learning rate {cfg.learning_rate:g}, {cfg.method}'s default")
    steps_per_epoch = math.ceil(rows_per_epoch / (cfg.batch_size * cfg.grad_accum))
    planned = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    return cfg, rotation, planned


def _training_args(cfg: TrainConfig, checkpoints: Path, planned: int, bf16: bool):
    """TRL's SFTConfig: cosine schedule with warm-up over the ``planned`` steps, answer-only loss, a log per step,
    four checkpoints a run unless ``save_steps`` says otherwise."""
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, round(cfg.warmup_ratio * planned)) if cfg.warmup_ratio else 0,
        max_grad_norm=cfg.max_grad_norm,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.save_steps or max(10, planned // 4),
        save_total_limit=2,
        report_to=cfg.report_to,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        completion_only_loss=True,
        max_length=cfg.max_seq_len,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        activation_checkpointing=False,  # set on the model by _setup_model, before peft wraps it
        disable_tqdm=True,  # replaced by _progress_callback: one bar with the loss, no dict per step
        dataloader_num_workers=0,
    )


def _setup_trainer(model, args, train_set, tokenizer, cfg: TrainConfig, rotation, log=print):
    """The trainer (``trainer.AgentpeftTrainer``): the answer-only loss, with the KL anchor and the shared-prefix
    forward, for the LoRA family; the phrasing rotation for any method; LoRA+ groups when asked for."""
    from transformers import PrinterCallback

    from .trainer import TRAIN_ONLY_INDEX, AgentpeftTrainer

    columns = ["prompt", "completion", *([TRAIN_ONLY_INDEX] if cfg.anchor_kl else [])]
    answer_only = cfg.method in MERGEABLE
    trainer = AgentpeftTrainer(model=model, args=args, train_dataset=train_set.select_columns(columns),
                               processing_class=tokenizer, answer_only=answer_only, anchor_kl=cfg.anchor_kl,
                               share_prefix=answer_only and shares_prefix(cfg), rotation=rotation)
    keep_trainable_fp32(model)
    if cfg.loraplus_lr_ratio > 1:
        trainer.optimizer = loraplus_optimizer(trainer, cfg.loraplus_lr_ratio, log)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_progress_callback())
    return trainer


def _run_training(trainer, cfg: TrainConfig, resume: bool, log=print) -> float:
    """Train (from the last checkpoint with ``resume``); the seconds it took."""
    checkpoint = _last_checkpoint(Path(trainer.args.output_dir)) if resume else None
    if checkpoint:
        log(f"resuming from {checkpoint}")
    start = time.perf_counter()
    if cfg.max_steps == 0:
        log("max_steps=0: the adapter is saved as initialized, untrained")
    else:
        trainer.train(resume_from_checkpoint=checkpoint)
    return time.perf_counter() - start


def _save(trainer, setup: ModelSetup, cfg: TrainConfig, out_dir: Path, seconds: float, log=print) -> TrainResult:
    """Save the adapter with its metadata, the training log and the loss curve to ``out_dir``; fail when the
    loss diverged. Under ``accelerate launch`` only the main process writes."""
    precision, device = _precision(setup, trainer.args), device_name()
    adapter_dir = out_dir / "adapter"
    if not trainer.is_world_process_zero():
        return TrainResult(adapter_dir, trainer.state.global_step, None, seconds, setup.trainable, setup.total, 0,
                           precision, device)
    if trainer.args.world_size > 1:
        log(f"trained data-parallel on {trainer.args.world_size} processes (accelerate)")
    setup.model.save_pretrained(str(adapter_dir))
    (adapter_dir / ADAPTER_META).write_text(json.dumps(
        {"method": cfg.method, "quantized_base": setup.quantized, "mergeable": cfg.method in MERGEABLE}, indent=2))
    history = trainer.state.log_history
    with open(out_dir / "train_log.jsonl", "w") as fh:
        for row in history:
            fh.write(json.dumps(row) + "\n")
    losses = [row["loss"] for row in history if "loss" in row]
    if cfg.max_steps != 0 and (not losses or not all(math.isfinite(x) for x in losses)):
        raise AgentpeftError(f"training diverged (loss {losses[-1:] or 'never logged'}); lower --lr and retry")
    plot_loss(history, out_dir / "loss_curve.png")
    return TrainResult(adapter_dir, trainer.state.global_step, losses[-1] if losses else None, seconds,
                       setup.trainable, setup.total, int(max((r.get("num_tokens", 0) for r in history), default=0)),
                       precision, device)


def _precision(setup: ModelSetup, args) -> str:
    """How the run held and computed its weights, in words (the build's train report)."""
    import torch

    weights = "NF4 dequantized once to fp32" if setup.dense else "NF4 4-bit" if setup.quantized else "fp32"
    weights += " weights (linear layers copied to bf16)" if setup.cast else " weights"
    compute = "bf16" if args.bf16 or setup.nf4_compute == torch.bfloat16 else "fp32"
    return f"{weights}, {compute} compute, fp32 adapter"


#: Longest row for which a CPU computes attention as plain matmuls (``eager_attention_on_cpu``): they keep the
#: whole attention matrix for the backward pass, which grows with the square of the length; longer rows
#: (retrieval mode's passages) use SDPA's kernel, whose memory grows linearly.
EAGER_MAX_TOKENS = 384


def micro_batched(cfg: TrainConfig, longest: int, log=print) -> TrainConfig:
    """``cfg`` with each batch of ``batch_size`` rows split into micro-batches of at most ``cfg.micro_batch_tokens``
    tokens at the longest row's length, their gradients accumulated: the same batches and the same loss (the
    answer tokens of the whole batch weigh equally), with the activation memory of a shorter batch."""
    size, budget = cfg.batch_size, cfg.micro_batch_tokens
    if not budget or size * longest <= budget or size == 1:
        return cfg
    micro = max([d for d in range(1, size + 1) if size % d == 0 and d * longest <= budget] or [1])
    log(f"rows of up to {longest} tokens: batches of {size} run as {size // micro} micro-batches of {micro}, "
        "gradients accumulated")
    return cfg.model_copy(update={"batch_size": micro, "grad_accum": cfg.grad_accum * (size // micro)})


def shares_prefix(cfg: TrainConfig) -> bool:
    """Whether training runs each batch's shared prompt prefix once (gradient checkpointing keeps no cache)."""
    return cfg.share_prefix and not cfg.gradient_checkpointing


def loraplus_optimizer(trainer, ratio: float, log=print):
    """The trainer's optimizer with LoRA+ groups: each B matrix (and DoRA magnitude) at ``ratio`` times the lr."""
    from peft.optimizers import create_loraplus_optimizer

    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    log(f"LoRA+: B matrices at {ratio:g}x the learning rate")
    return create_loraplus_optimizer(trainer.model, cls, loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=trainer.args.weight_decay, **kwargs)


def keep_trainable_fp32(model) -> None:
    """Keep the trainable weights in fp32 where TRL made them bf16.

    TRL stores a 4-bit model's adapter in bf16, as the QLoRA paper does on GPUs. Its optimizer steps
    then round in bf16: on a CPU with native bf16 the default build reached 69.1% held-out accuracy and
    lost 12.2 probe points with a bf16 adapter, 86.9% and 5.1 with an fp32 one, both computing in bf16
    (docs/performance.md). A CPU without native bf16 also emulates bf16 matmuls about 4 times slower than
    fp32, and peft runs each LoRA product in its weights' dtype. Mixed precision on a GPU keeps fp32
    master weights the same way.
    """
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.bfloat16:
            param.data = param.data.float()


def plot_loss(history: list[dict], path: Path) -> None:
    """A PNG of training loss per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["step"], r["loss"]) for r in history if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.5)
    ax.set(xlabel="step", ylabel="training loss (answer tokens)", title="Loss curve")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _last_checkpoint(folder: Path) -> str | None:
    """The newest complete checkpoint: the Trainer writes trainer_state.json last, so a checkpoint
    cut short by a kill (which the Trainer does not write atomically) lacks it and is skipped."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    steps = {int(p.name.rpartition("-")[2]): p for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.name.rpartition("-")[2].isdigit() and (p / "trainer_state.json").is_file()}
    return str(steps[max(steps)]) if steps else None


def phrasing_rotation(rows) -> tuple[list[list[int]], list[int]]:
    """The row indices of each fact's phrasings, and those of the train-only rows (which every epoch trains)."""
    missing = {"fact_id", "train_only"} - set(rows.column_names)
    if missing:
        raise AgentpeftError(f"rotate_phrasings needs the dataset's {', '.join(sorted(missing))} column; rebuild it "
                             "with `agentpeft data` or turn rotate_phrasings off")
    facts: dict[str, list[int]] = {}
    train_only = []
    for i, (fact, is_train_only) in enumerate(zip(rows["fact_id"], rows["train_only"])):
        if is_train_only:
            train_only.append(i)
        else:
            facts.setdefault(str(fact), []).append(i)
    return list(facts.values()), train_only


def _progress_callback():
    """The trainer callback that shows training progress (bench/profile_train.py puts its profiler window here)."""
    from .trainer import ProgressBar

    return ProgressBar()
