"""Stage 3, train: a PEFT adapter (QLoRA by default) trained with TRL's SFTTrainer on the answer tokens."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from .. import models, progress
from ..errors import AgentpeftError
from ..models import ADAPTER_META, cache_argument, dense_nf4_fits, device_name, load_model, load_tokenizer
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
    """Train an adapter on the dataset's train split; save it to ``out_dir/adapter``."""
    import torch
    from datasets import load_from_disk
    from peft import get_peft_model, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    for logger in set(cfg.report_to) - {"none"}:
        if importlib.util.find_spec(logger) is None:
            raise AgentpeftError(f"--report-to {logger} needs the {logger} package; pip install {logger}")
    torch.manual_seed(cfg.seed)
    train_set = load_from_disk(str(dataset_dir))["train"]
    columns = ["prompt", "completion"]
    if cfg.anchor_kl and cfg.method not in MERGEABLE:
        log(f"anchor_kl applies to qlora, lora and dora: {cfg.method} learns the general "
            "pairs' answers by cross-entropy")
        cfg = cfg.model_copy(update={"anchor_kl": 0.0})
    if cfg.anchor_kl:
        if "train_only" not in train_set.column_names:
            raise AgentpeftError(f"{dataset_dir} predates anchor_kl (no train_only column); rebuild it with "
                                 "`agentpeft data`")
        train_set = with_anchor_column(train_set)
        columns.append("anchor")
    tokenizer = load_tokenizer(base_dir)
    tokenizer.padding_side = "right"
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
    cuda = torch.cuda.is_available()
    native_bf16 = models.bf16_supported()
    bf16 = cfg.bf16 if cfg.bf16 is not None else native_bf16
    if bf16 and not native_bf16:
        log("bf16 on hardware without native bf16 is emulated, slower than fp32")
    cast = bf16 and models.frozen_linears_to_bf16(model)
    if cast:
        if not cuda:
            models.bound_onednn_caches()
            longest = max(train_set["n_tokens"]) if "n_tokens" in train_set.column_names else cfg.max_seq_len
            if longest <= EAGER_MAX_TOKENS:
                models.eager_attention_on_cpu(model.get_base_model())
        log("bf16: the base's linear layers copied to bf16; the adapter and the logits stay fp32")
    trainable, total = model.get_nb_trainable_parameters()
    log(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    if "n_tokens" in train_set.column_names and not cuda:  # a GPU holds a batch of long rows easily
        cfg = micro_batched(cfg, max(train_set["n_tokens"]), log)
    rotation = phrasing_rotation(train_set) if cfg.rotate_phrasings else None
    rows_per_epoch = len(train_set)
    if rotation:
        facts, always = rotation
        rows_per_epoch = len(facts) + len(always)
        log(f"rotate_phrasings: each epoch trains {rows_per_epoch} of the {len(train_set)} rows, one phrasing of each "
            f"of {len(facts)} facts in turn and the {len(always)} train-only pairs")
    steps_per_epoch = math.ceil(rows_per_epoch / (cfg.batch_size * cfg.grad_accum))
    planned = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    args = SFTConfig(
        output_dir=str(out_dir / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
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
        use_cpu=not cuda,
        completion_only_loss=True,
        max_length=cfg.max_seq_len,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        gradient_checkpointing=False,  # set on the model above, before peft wraps it
        disable_tqdm=True,  # replaced by _ProgressBar: one bar with the loss, no dict per step
        dataloader_num_workers=0,
    )
    from transformers import PrinterCallback

    trainer_cls = SFTTrainer
    if cfg.method in MERGEABLE:
        # Under gradient checkpointing the model keeps no key/value cache, which prefix sharing needs.
        share = shares_prefix(cfg)
        trainer_cls = _answer_only_trainer(SFTTrainer, cfg.anchor_kl, share)
    if rotation:
        trainer_cls = _rotating_trainer(trainer_cls, *rotation, group_by_length=cfg.group_by_length)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_set.select_columns(columns),
                          processing_class=tokenizer)
    keep_trainable_fp32(model)
    if cfg.loraplus_lr_ratio > 1:
        trainer.optimizer = loraplus_optimizer(trainer, cfg.loraplus_lr_ratio, log)
    weights = "NF4 dequantized once to fp32" if dense else "NF4 4-bit" if quantized else "fp32"
    weights += " weights (linear layers copied to bf16)" if cast else " weights"
    compute = "bf16" if args.bf16 or nf4_compute == torch.bfloat16 else "fp32"
    precision, device = f"{weights}, {compute} compute, fp32 adapter", device_name()
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_progress_callback())
    checkpoint = _last_checkpoint(out_dir / "checkpoints") if resume else None
    if checkpoint:
        log(f"resuming from {checkpoint}")
    start = time.perf_counter()
    if cfg.max_steps == 0:
        log("max_steps=0: the adapter is saved as initialized, untrained")
    else:
        trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    adapter_dir = out_dir / "adapter"
    if not trainer.is_world_process_zero():  # under `accelerate launch`, the main process writes the results
        return TrainResult(adapter_dir, trainer.state.global_step, None, seconds, trainable, total, 0, precision, device)
    if args.world_size > 1:
        log(f"trained data-parallel on {args.world_size} processes (accelerate)")
    model.save_pretrained(str(adapter_dir))
    (adapter_dir / ADAPTER_META).write_text(json.dumps(
        {"method": cfg.method, "quantized_base": quantized, "mergeable": cfg.method in MERGEABLE}, indent=2))
    history = trainer.state.log_history
    with open(out_dir / "train_log.jsonl", "w") as fh:
        for row in history:
            fh.write(json.dumps(row) + "\n")
    losses = [row["loss"] for row in history if "loss" in row]
    if cfg.max_steps != 0 and (not losses or not all(math.isfinite(x) for x in losses)):
        raise AgentpeftError(f"training diverged (loss {losses[-1:] or 'never logged'}); lower --lr and retry")
    plot_loss(history, out_dir / "loss_curve.png")
    return TrainResult(adapter_dir, trainer.state.global_step, losses[-1] if losses else None, seconds, trainable, total,
                       int(max((r.get("num_tokens", 0) for r in history), default=0)), precision, device)


#: Longest row for which a CPU computes attention as plain matmuls (``eager_attention_on_cpu``): they keep the
#: whole attention matrix for the backward pass, which grows with the square of the length; longer rows
#: (retrieval mode's passages) use SDPA's kernel, whose memory grows linearly.
EAGER_MAX_TOKENS = 384
#: Longest sequence of a batch's tails packed behind their shared prefix: a packed sequence attends through a
#: full mask, whose cost grows with the square of its length, so longer groups run row by row instead.
PACK_MAX_TOKENS = 1024


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


def _answer_only_trainer(base_cls, anchor_kl: float = 0.0, share_prefix: bool = False):
    """An SFTTrainer whose loss runs the LM head on the answer positions only.

    TRL's fused head scores every position on a CPU (its compact path is for Triton devices), and
    computes entropy and top-1 metrics too; with answers about a third of each row, projecting only
    the answer positions onto the vocabulary makes a training step about 1.4 times faster here. The
    loss is the same sum of answer-token cross-entropies over the same token count
    (tests/test_train.py compares it, and its gradients, with TRL's).

    With ``anchor_kl`` the rows marked ``train_only`` (general pairs) are scored instead by
    ``anchor_kl`` times KL(base || tuned) on their answer tokens, the base being the same model with
    its adapter switched off (its distributions computed once, before training): they teach the
    adapter to leave general chats as the base answers them.
    With ``share_prefix`` the prompt prefix that rows of a batch share is computed once
    (``shared_prefix_hidden``).
    """
    import torch
    import torch.nn.functional as F

    class AnswerOnlyLossTrainer(base_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if anchor_kl:
                self.data_collator = _with_row_value(self.data_collator, "anchor")
                self._base_logp = self._base_answer_log_probs()

        def autocast_smart_context_manager(self, cache_enabled=True):
            # compute_loss calls the trunk and the head itself, not the forward accelerate wraps in autocast.
            return self.accelerator.autocast()

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if anchor_kl:
                self._signature_columns = [*self._signature_columns, "anchor"]

        def _trunk_and_head(self, model):
            peft_model = self.accelerator.unwrap_model(model)
            inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
            return peft_model, inner, getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()

        def _base_answer_log_probs(self, batch_size: int = 16, top: int = 128) -> dict[int, tuple]:
            """The base model's next-token distributions on each anchor row, computed once before training:
            the targets of the KL term, kept as the ``top`` most likely tokens (ids, log-probabilities) of
            each position, the rest of the probability mass being one more bucket."""
            peft_model, _, trunk, head = self._trunk_and_head(self.model)
            rows = [r for r in self.train_dataset if r["anchor"] >= 0]
            out = {}
            with torch.no_grad(), peft_model.disable_adapter(), self.autocast_smart_context_manager():
                for start in range(0, len(rows), batch_size):
                    chunk = rows[start:start + batch_size]
                    batch = self.data_collator.inner([{k: v for k, v in r.items() if k != "anchor"} for r in chunk])
                    batch = {k: v.to(self.model.device) for k, v in batch.items()}
                    mask = batch.pop("labels")[:, 1:] != -100
                    if share_prefix and set(batch) == {"input_ids", "attention_mask"}:
                        hidden = shared_prefix_hidden(trunk, batch["input_ids"], batch["attention_mask"])[:, :-1]
                    else:
                        hidden = trunk(**batch, use_cache=False).last_hidden_state[:, :-1]
                    # One head call per chunk: a call per row streams the whole vocabulary matrix for a few positions.
                    logp, ids = _logits(head, hidden[mask]).log_softmax(-1).topk(top, dim=-1)
                    counts = mask.sum(1).tolist()
                    for row, row_ids, row_logp in zip(chunk, ids.split(counts), logp.split(counts)):
                        out[row["anchor"]] = (row_ids, row_logp)
            return out

        def _anchor_kl(self, hidden, head, anchors, positions):
            """Sum over ``positions`` of KL(base || tuned) on the base's top tokens plus the rest bucket."""
            ids, base_logp = (torch.cat(t) for t in zip(*(self._base_logp[int(i)] for i in anchors[anchors >= 0])))
            tuned_logp = _logits(head, hidden[positions]).log_softmax(-1).gather(1, ids)
            base_p = base_logp.exp()
            base_rest = (1 - base_p.sum(1)).clamp(min=1e-12)
            tuned_rest = (1 - tuned_logp.exp().sum(1)).clamp(min=1e-12)
            return (base_p * (base_logp - tuned_logp)).sum() + (base_rest * (base_rest.log() - tuned_rest.log())).sum()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            anchors = inputs.pop("anchor", None)
            _, inner, trunk, head = self._trunk_and_head(model)
            text = inner.config.get_text_config()
            plain_head = all(getattr(text, k, None) in (None, 1.0) for k in
                             ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier"))
            # DDP synchronises gradients through the wrapper's own forward; keep TRL's path there.
            if return_outputs or not plain_head or self.accelerator.num_processes > 1 or not self.model.training:
                if anchors is not None and bool((anchors >= 0).any()) and self.model.training:
                    raise AgentpeftError("anchor_kl is not supported for this model or under data parallelism")
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"][:, 1:]
            mask = labels != -100
            attention = inputs.get("attention_mask")
            if share_prefix and attention is not None and set(inputs) <= {"input_ids", "attention_mask", "labels"} \
                    and bool((attention[:, 1:] <= attention[:, :-1]).all()):  # right-padded rows
                hidden = shared_prefix_hidden(trunk, inputs["input_ids"], attention)[:, :-1]
            else:
                backbone = {k: v for k, v in inputs.items() if k != "labels"}
                hidden = trunk(**backbone, use_cache=False).last_hidden_state[:, :-1]
            if anchors is None or not bool((anchors >= 0).any()):
                total = F.cross_entropy(_logits(head, hidden[mask]), labels[mask], reduction="sum")
            else:
                rows = (anchors >= 0).to(mask.device)
                own, general = mask & ~rows[:, None], mask & rows[:, None]
                total = F.cross_entropy(_logits(head, hidden[own]), labels[own], reduction="sum")
                total = total + anchor_kl * self._anchor_kl(hidden, head, anchors, general)
            count = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = total / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            self._total_train_tokens += int(inputs["attention_mask"].sum())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

    return AnswerOnlyLossTrainer


def _logits(head, hidden):
    """The head's fp32 logits, outside autocast: bf16 keeps 8 significant bits (a logit near 20 in steps of 0.125)."""
    import torch

    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.float()).float()


def shared_prefix_hidden(trunk, input_ids, attention_mask, min_prefix: int = 8, packed: bool | None = None):
    """``trunk(input_ids, attention_mask).last_hidden_state`` with the prompt prefix that rows share computed once.

    Rows of a right-padded batch are grouped by their common leading tokens (a recipe's system prompt
    and the chat template around it are identical in every row); each group runs that prefix once and
    then its rows' remaining tokens on top of the prefix's key/value cache: packed into one sequence
    without padding where the attention implementation takes a custom mask (each tail sees the prefix
    and itself only), else as padded rows over a repeated cache; with ``packed="one_pass"`` the prefix
    and the packed tails run as one sequence, in one call. Causal attention makes the result the
    same as the full forward on every real token (tests/test_train.py checks hidden states and
    gradients; padding positions hold no meaningful values). ``packed`` None packs where the implementation
    takes the mask, in one pass under bf16 autocast on a CPU, where a second pass of small operations
    costs more than the matmuls it saves (1.21x in an A/B, docs/performance.md).
    """
    import torch

    cache_name = cache_argument(trunk)
    if packed is None:
        packed = trunk.config._attn_implementation in ("sdpa", "eager") and (
            "one_pass" if input_ids.device.type == "cpu" and torch.is_autocast_enabled("cpu") else True)
    lengths = attention_mask.sum(1).tolist()
    width = input_ids.size(1)
    parts, order = [], []
    for rows, shared in prefix_groups(input_ids, attention_mask, min_prefix):
        index = torch.tensor(rows, device=input_ids.device)
        if shared and packed and sum(lengths[r] for r in rows) - (len(rows) - 1) * shared > PACK_MAX_TOKENS:
            shared = 0  # a long packed sequence's mask costs more than the prefix it saves
        if not shared:
            parts.append(trunk(input_ids=input_ids[index], attention_mask=attention_mask[index],
                               use_cache=False).last_hidden_state)
        elif packed:
            one_pass = packed == "one_pass"
            tails = [int(lengths[r]) - shared for r in rows]
            pieces = [input_ids[r, shared:shared + t] for r, t in zip(rows, tails)]
            spans = [torch.arange(shared, shared + t, device=input_ids.device) for t in tails]
            if one_pass:
                pieces.insert(0, input_ids[rows[0], :shared])
                spans.insert(0, torch.arange(shared, device=input_ids.device))
                run, dtype = {"use_cache": False}, trunk.get_input_embeddings().weight.dtype
            else:
                prefix = trunk(input_ids=input_ids[index[:1], :shared], use_cache=True)
                run, dtype = {cache_name: prefix[cache_name], "use_cache": True}, prefix.last_hidden_state.dtype
            mask = _packed_tail_mask(shared, tails, dtype, input_ids.device, trunk.config._attn_implementation,
                                     prefix_rows=one_pass)
            hidden = trunk(input_ids=torch.cat(pieces)[None], attention_mask=mask, position_ids=torch.cat(spans)[None],
                           **run).last_hidden_state[0]
            head = hidden[None, :shared] if one_pass else prefix.last_hidden_state
            tail = torch.nn.utils.rnn.pad_sequence(list(hidden[shared if one_pass else 0:].split(tails)),
                                                   batch_first=True)
            tail = torch.nn.functional.pad(tail, (0, 0, 0, width - shared - tail.size(1)))
            parts.append(torch.cat([head.expand(len(rows), -1, -1), tail], dim=1))
        else:
            prefix = trunk(input_ids=input_ids[index[:1], :shared], use_cache=True)
            cache = prefix[cache_name]
            cache.batch_repeat_interleave(len(rows))
            tail = trunk(input_ids=input_ids[index, shared:], attention_mask=attention_mask[index],
                         position_ids=torch.arange(shared, width, device=input_ids.device).expand(len(rows), -1),
                         **{cache_name: cache}, use_cache=True).last_hidden_state
            parts.append(torch.cat([prefix.last_hidden_state.expand(len(rows), -1, -1), tail], dim=1))
        order += rows
    hidden = torch.cat(parts)
    return hidden[torch.argsort(torch.tensor(order, device=hidden.device))]


def prefix_groups(input_ids, attention_mask, min_prefix: int = 8) -> list[tuple[list[int], int]]:
    """The rows of a right-padded batch grouped by their common leading tokens: ``(rows, shared)`` pairs,
    ``shared`` being the length of the prefix the group runs once (0 for a row that shares none with
    another: it runs whole). Every row keeps at least one token of its own."""
    lengths = attention_mask.sum(1).tolist()
    ids = input_ids.tolist()
    groups: list[list] = []  # [rows, length of the prefix they share]
    for row, n in enumerate(lengths):
        for group in groups:
            leader = group[0][0]
            limit = min(group[1], n - 1)
            common = next((i for i in range(limit) if ids[row][i] != ids[leader][i]), limit)
            if common >= min_prefix:
                group[0].append(row)
                group[1] = common
                break
        else:
            groups.append([[row], n - 1])
    return [(rows, shared if len(rows) > 1 and shared >= min_prefix else 0) for rows, shared in groups]


def _packed_tail_mask(prefix: int, tails: list[int], dtype, device, implementation: str, prefix_rows: bool = False):
    """The 4D attention mask of tails packed into one sequence after a cached prefix: each tail token
    sees the whole prefix and the tokens of its own tail up to itself. With ``prefix_rows`` the prefix's
    own tokens come first in the sequence (causal among themselves). Boolean for SDPA, additive for eager."""
    import torch

    segment = torch.repeat_interleave(torch.arange(len(tails), device=device), torch.tensor(tails, device=device))
    causal = torch.ones(len(segment), len(segment), dtype=torch.bool, device=device).tril()
    allowed = torch.cat([torch.ones(len(segment), prefix, dtype=torch.bool, device=device),
                         causal & (segment[:, None] == segment[None, :])], dim=1)
    if prefix_rows:
        own = torch.ones(prefix, prefix, dtype=torch.bool, device=device).tril()
        allowed = torch.cat([torch.cat([own, torch.zeros(prefix, len(segment), dtype=torch.bool, device=device)], 1),
                             allowed])
    allowed = allowed[None, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def phrasing_rotation(rows) -> tuple[list[list[int]], list[int]]:
    """The row indices of each fact's phrasings, and those of the train-only rows (which every epoch trains)."""
    missing = {"fact_id", "train_only"} - set(rows.column_names)
    if missing:
        raise AgentpeftError(f"rotate_phrasings needs the dataset's {', '.join(sorted(missing))} column; rebuild it "
                             "with `agentpeft data` or turn rotate_phrasings off")
    facts: dict[str, list[int]] = {}
    always = []
    for i, (fact, train_only) in enumerate(zip(rows["fact_id"], rows["train_only"])):
        if train_only:
            always.append(i)
        else:
            facts.setdefault(str(fact), []).append(i)
    return list(facts.values()), always


class RotatingSampler:
    """Epoch e yields, shuffled (or length-grouped), phrasing e (mod its count) of every fact and every other row.

    Each fact starts its turn at a seeded offset, so no epoch trains one generator's phrasings alone.
    The trainer calls ``set_epoch`` before each epoch (a resumed run too), which picks the epoch's rows.
    """

    def __init__(self, facts: list[list[int]], always: list[int], seed: int, lengths: list[int] | None = None,
                 batch_size: int = 1):
        import random

        rng = random.Random(seed)
        self.facts, self.always, self.seed = facts, always, seed
        self.offsets = [rng.randrange(len(group)) for group in facts]
        self.lengths, self.batch_size, self.epoch = lengths, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.facts) + len(self.always)

    def epoch_rows(self, epoch: int) -> list[int]:
        return [g[(epoch + o) % len(g)] for g, o in zip(self.facts, self.offsets)] + self.always

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        rows = self.epoch_rows(self.epoch)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.lengths is None:
            order = torch.randperm(len(rows), generator=generator).tolist()
        else:
            order = get_length_grouped_indices([self.lengths[i] for i in rows], self.batch_size, generator=generator)
        return iter([rows[i] for i in order])


def _rotating_trainer(base_cls, facts: list[list[int]], always: list[int], group_by_length: bool):
    """``base_cls`` training each epoch on one phrasing per fact (``RotatingSampler``)."""

    class RotatingTrainer(base_cls):
        def _get_train_sampler(self, train_dataset=None):
            rows = self.train_dataset if train_dataset is None else train_dataset
            lengths = [len(ids) for ids in rows["input_ids"]] if group_by_length else None
            return RotatingSampler(facts, always, self.args.data_seed or self.args.seed, lengths,
                                   self.args.train_batch_size * self.args.gradient_accumulation_steps)

    return RotatingTrainer


def with_anchor_column(rows):
    """``rows`` with an ``anchor`` column: the row's index for train-only (general) pairs, -1 for the others."""
    return rows.map(lambda row, i: {"anchor": i if row["train_only"] else -1}, with_indices=True, keep_in_memory=True)


class _with_row_value:
    """A collator that passes an integer dataset column to the loss as a tensor, one value per row."""

    def __init__(self, inner, column: str):
        self.inner, self.column = inner, column

    def __call__(self, examples: list[dict]):
        import torch

        values = [int(e.pop(self.column)) for e in examples]
        batch = self.inner(examples)
        batch[self.column] = torch.tensor(values)
        return batch


def _progress_callback():
    """A trainer callback that shows one progress bar with the running loss."""
    from transformers import TrainerCallback

    class ProgressBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = progress.bar(total=state.max_steps, desc="train", unit="step")
            self.bar.update(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return ProgressBar()
