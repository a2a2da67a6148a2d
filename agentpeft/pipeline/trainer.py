"""The train stage's trainer: TRL's SFTTrainer with the answer-only loss, the KL anchor and phrasing rotation.

Each addition is a named unit, off unless the train stage asks for it:

- the answer-only loss (``AgentpeftTrainer.answer_only_loss``): the LM head runs on the answer positions only;
- the KL anchor (``kl_to_base``): train-only rows are scored by their KL divergence from the base model;
- the shared-prefix forward (``shared_prefix.shared_prefix_hidden``), used by both of the above;
- phrasing rotation (``RotatingSampler``): each epoch trains one phrasing of every fact.

This module imports torch and TRL; the train stage imports it when it builds its trainer.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from trl import SFTTrainer

from .. import progress
from ..errors import AgentpeftError
from .shared_prefix import shared_prefix_hidden

#: The column the train stage adds for the KL anchor: a train-only row's index in the dataset, -1 for other rows.
TRAIN_ONLY_INDEX = "train_only_index"
#: Config fields that scale a model's logits; a head with any of them set is left to TRL's own forward.
_LOGIT_SCALES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")


class AgentpeftTrainer(SFTTrainer):
    """SFTTrainer with the train stage's additions, each off by default.

    ``answer_only``: the loss runs the LM head on the answer positions only (``answer_only_loss``).
    TRL's fused head scores every position on a CPU (its compact path is for Triton devices), and
    computes entropy and top-1 metrics too; with answers about a third of each row, projecting only
    the answer positions onto the vocabulary makes a training step about 1.4 times faster here. The
    loss is the same sum of answer-token cross-entropies over the same token count
    (tests/test_train.py compares it, and its gradients, with TRL's).

    ``anchor_kl`` (with ``answer_only``): the train-only rows, marked by the ``TRAIN_ONLY_INDEX`` column,
    are scored instead by ``anchor_kl`` times KL(base || tuned) on their answer tokens, the base being the
    same model with its adapter switched off (its distributions computed once, before training): they
    teach the adapter to leave general chats as the base answers them.

    ``share_prefix`` (with ``answer_only``): the prompt prefix that rows of a batch share is computed once
    (``shared_prefix_hidden``).

    ``rotation``: ``(facts, train_only)`` row indices from ``train.phrasing_rotation``; each epoch trains
    one phrasing of every fact and every train-only row (``RotatingSampler``).
    """

    def __init__(self, *args, answer_only: bool = False, anchor_kl: float = 0.0, share_prefix: bool = False,
                 rotation: tuple[list[list[int]], list[int]] | None = None, **kwargs):
        if (anchor_kl or share_prefix) and not answer_only:
            raise ValueError("anchor_kl and share_prefix are parts of the answer-only loss: pass answer_only=True")
        self.answer_only, self.anchor_kl, self.share_prefix, self.rotation = answer_only, anchor_kl, share_prefix, \
            rotation
        super().__init__(*args, **kwargs)
        if anchor_kl:
            self.data_collator = RowValueCollator(self.data_collator, TRAIN_ONLY_INDEX)
            self._base_logp = self._base_answer_log_probs()

    # --- the Trainer hooks each addition needs --------------------------------------------------------------

    def autocast_smart_context_manager(self, cache_enabled=True):
        if not self.answer_only:
            return super().autocast_smart_context_manager(cache_enabled)
        # answer_only_loss calls the trunk and the head itself, not the forward accelerate wraps in autocast.
        return self.accelerator.autocast()

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.anchor_kl:
            self._signature_columns = [*self._signature_columns, TRAIN_ONLY_INDEX]

    def _get_train_sampler(self, train_dataset=None):
        if self.rotation is None:
            return super()._get_train_sampler(train_dataset)
        rows = self.train_dataset if train_dataset is None else train_dataset
        grouped = self.args.train_sampling_strategy == "group_by_length"
        lengths = [len(ids) for ids in rows["input_ids"]] if grouped else None
        return RotatingSampler(*self.rotation, self.args.data_seed or self.args.seed, lengths,
                               self.args.train_batch_size * self.args.gradient_accumulation_steps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.answer_only:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        train_only = inputs.pop(TRAIN_ONLY_INDEX, None)
        _, inner, trunk, head = self._trunk_and_head(model)
        plain_head = all(getattr(inner.config.get_text_config(), k, None) in (None, 1.0) for k in _LOGIT_SCALES)
        # DDP synchronises gradients through the wrapper's own forward; keep TRL's path there.
        if return_outputs or not plain_head or self.accelerator.num_processes > 1 or not self.model.training:
            if train_only is not None and bool((train_only >= 0).any()) and self.model.training:
                raise AgentpeftError("anchor_kl is not supported for this model or under data parallelism")
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self.answer_only_loss(trunk, head, inputs, train_only, num_items_in_batch)

    # --- the answer-only loss and the KL anchor --------------------------------------------------------------

    def answer_only_loss(self, trunk, head, inputs: dict, train_only, num_items_in_batch=None):
        """Cross-entropy of the answer tokens, the head run on the answer positions only; with ``anchor_kl``, the
        answer tokens of train-only rows (``train_only`` >= 0) add ``anchor_kl`` times their ``kl_to_base``
        instead. Divided by the batch's answer-token count, as TRL's loss is."""
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        hidden = self._hidden_states(trunk, {k: v for k, v in inputs.items() if k != "labels"})[:, :-1]
        if train_only is None or not bool((train_only >= 0).any()):
            total = F.cross_entropy(_logits(head, hidden[mask]), labels[mask], reduction="sum")
        else:
            rows = (train_only >= 0).to(mask.device)
            own, anchored = mask & ~rows[:, None], mask & rows[:, None]
            total = F.cross_entropy(_logits(head, hidden[own]), labels[own], reduction="sum")
            total = total + self.anchor_kl * self._kl_anchor(hidden, head, train_only, anchored)
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = total / torch.as_tensor(count).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        self._total_train_tokens += int(inputs["attention_mask"].sum())
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return loss

    def _hidden_states(self, trunk, batch: dict):
        """The trunk's last hidden states of ``batch`` (model inputs, no labels): with ``share_prefix``, a
        right-padded batch of token ids runs its shared prompt prefix once."""
        attention = batch.get("attention_mask")
        if self.share_prefix and attention is not None and set(batch) <= {"input_ids", "attention_mask"} \
                and bool((attention[:, 1:] <= attention[:, :-1]).all()):  # right-padded rows
            return shared_prefix_hidden(trunk, batch["input_ids"], attention)
        return trunk(**batch, use_cache=False).last_hidden_state

    def _kl_anchor(self, hidden, head, train_only, positions):
        """``kl_to_base`` over ``positions`` (the train-only rows' answer positions), against the base's
        distributions of those rows."""
        ids, base_logp = (torch.cat(t) for t in zip(*(self._base_logp[int(i)] for i in train_only[train_only >= 0])))
        tuned_logp = _logits(head, hidden[positions]).log_softmax(-1).gather(1, ids)
        return kl_to_base(base_logp, tuned_logp)

    def _base_answer_log_probs(self, batch_size: int = 16, top: int = 128) -> dict[int, tuple]:
        """The base model's next-token distributions on each train-only row, computed once before training:
        the targets of the KL anchor, kept as the ``top`` most likely tokens (ids, log-probabilities) of
        each answer position, the rest of the probability mass being one more bucket."""
        peft_model, _, trunk, head = self._trunk_and_head(self.model)
        rows = [r for r in self.train_dataset if r[TRAIN_ONLY_INDEX] >= 0]
        out = {}
        with torch.no_grad(), peft_model.disable_adapter(), self.autocast_smart_context_manager():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                batch = self.data_collator.inner([{k: v for k, v in r.items() if k != TRAIN_ONLY_INDEX}
                                                  for r in chunk])
                batch = {k: v.to(self.model.device) for k, v in batch.items()}
                mask = batch.pop("labels")[:, 1:] != -100
                hidden = self._hidden_states(trunk, batch)[:, :-1]
                # One head call per chunk: a call per row streams the whole vocabulary matrix for a few positions.
                logp, ids = _logits(head, hidden[mask]).log_softmax(-1).topk(top, dim=-1)
                counts = mask.sum(1).tolist()
                for row, row_ids, row_logp in zip(chunk, ids.split(counts), logp.split(counts)):
                    out[row[TRAIN_ONLY_INDEX]] = (row_ids, row_logp)
        return out

    def _trunk_and_head(self, model):
        """The peft model, the transformers model inside it, its trunk (the decoder without the head) and head."""
        peft_model = self.accelerator.unwrap_model(model)
        inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        return peft_model, inner, getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()


def kl_to_base(base_logp, tuned_logp):
    """Sum over positions of KL(base || tuned), on the base's top tokens plus one bucket for the rest of the mass.

    ``base_logp`` holds the base's log-probabilities of its top tokens at each position, ``tuned_logp`` the
    tuned model's log-probabilities of the same tokens (both positions x top)."""
    base_p = base_logp.exp()
    base_rest = (1 - base_p.sum(1)).clamp(min=1e-12)
    tuned_rest = (1 - tuned_logp.exp().sum(1)).clamp(min=1e-12)
    return (base_p * (base_logp - tuned_logp)).sum() + (base_rest * (base_rest.log() - tuned_rest.log())).sum()


def _logits(head, hidden):
    """The head's fp32 logits, outside autocast: bf16 keeps 8 significant bits (a logit near 20 in steps of 0.125)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.float()).float()


def with_train_only_index(rows):
    """``rows`` with a ``TRAIN_ONLY_INDEX`` column: the row's index for train-only rows, -1 for the others."""
    return rows.map(lambda row, i: {TRAIN_ONLY_INDEX: i if row["train_only"] else -1}, with_indices=True,
                    keep_in_memory=True)


class RowValueCollator:
    """A collator that passes an integer dataset column to the loss as a tensor, one value per row."""

    def __init__(self, inner, column: str):
        self.inner, self.column = inner, column

    def __call__(self, examples: list[dict]):
        values = [int(e.pop(self.column)) for e in examples]
        batch = self.inner(examples)
        batch[self.column] = torch.tensor(values)
        return batch


class RotatingSampler:
    """Epoch e yields, shuffled (or length-grouped), phrasing e (mod its count) of every fact and every
    train-only row.

    Each fact starts its turn at a seeded offset, so no epoch trains one generator's phrasings alone.
    The trainer calls ``set_epoch`` before each epoch (a resumed run too), which picks the epoch's rows.
    """

    def __init__(self, facts: list[list[int]], train_only: list[int], seed: int, lengths: list[int] | None = None,
                 batch_size: int = 1):
        rng = random.Random(seed)
        self.facts, self.train_only, self.seed = facts, train_only, seed
        self.offsets = [rng.randrange(len(group)) for group in facts]
        self.lengths, self.batch_size, self.epoch = lengths, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.facts) + len(self.train_only)

    def epoch_rows(self, epoch: int) -> list[int]:
        return [g[(epoch + o) % len(g)] for g, o in zip(self.facts, self.offsets)] + self.train_only

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        rows = self.epoch_rows(self.epoch)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.lengths is None:
            order = torch.randperm(len(rows), generator=generator).tolist()
        else:
            order = get_length_grouped_indices([self.lengths[i] for i in rows], self.batch_size, generator=generator)
        return iter([rows[i] for i in order])


class ProgressBar(TrainerCallback):
    """One progress bar for training, with the running loss (in place of the Trainer's dict per step)."""

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
