"""Each PEFT method trains on the tiny model, loads back, and (where it can) merges exactly."""

import functools
import json
import math
import os

import pytest

from agentpeft.errors import AgentpeftError
from agentpeft.models import adapter_meta, load_tokenizer, load_tuned
from agentpeft.recipe import configure
from agentpeft.pipeline.dataset import build_dataset
from agentpeft.pipeline.evaluate import generate
from agentpeft.pipeline.ingest import ingest
from agentpeft.pipeline.merge import merge
from agentpeft.pipeline.train import train


@pytest.fixture(scope="module")
def dataset(tiny_base, tmp_path_factory):
    recipe = configure("support-bot")
    out = tmp_path_factory.mktemp("data")
    return build_dataset(ingest(recipe.kb_path), ["faq", "facts"], load_tokenizer(tiny_base), recipe.system_prompt,
                         out, train_phrasings=1).path


def _cfg(**over):
    return configure("support-bot", **{"max_steps": 2, "batch_size": 4, "virtual_tokens": 4, **over}).train


@pytest.mark.parametrize("method", ["qlora", "lora", "dora", "prefix", "prompt"])
def test_method_trains_loads_and_generates(method, tiny_base, dataset, tmp_path):
    logs = []
    result = train(tiny_base, dataset, tmp_path, _cfg(method=method), log=logs.append)
    assert result.steps == 2 and result.trainable_params > 0
    params = [line for line in logs if line.startswith("trainable params: ")]
    assert len(params) == 1 and "trainable%" in params[0]
    # support-bot's KL anchor needs a LoRA-family adapter; the other methods say so and use cross-entropy.
    assert any(line.startswith("anchor_kl applies to") for line in logs) == (method in ("prefix", "prompt"))
    # ... and train at their own learning rate, not the recipe's LoRA one.
    assert any(line.startswith("learning rate ") for line in logs) == (method in ("prefix", "prompt"))
    meta = adapter_meta(result.adapter_dir)
    assert meta == {"method": method, "quantized_base": method == "qlora",
                    "mergeable": method in ("qlora", "lora", "dora")}
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    model = load_tuned(tiny_base, result.adapter_dir)
    reply = generate(model, load_tokenizer(tiny_base), [[{"role": "user", "content": "Hi"}]], max_new_tokens=3)
    assert isinstance(reply[0], str)
    if meta["mergeable"]:
        merged = merge(tiny_base, result.adapter_dir, tmp_path / "merged")
        assert merged.max_logit_diff <= 1e-3
        assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    else:
        with pytest.raises(AgentpeftError, match="cannot be merged"):
            merge(tiny_base, result.adapter_dir, tmp_path / "merged")


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_reference_perplexity_scores_prompt_and_prefix_tuned_models(method, tiny_base, dataset, tmp_path):
    from agentpeft.pipeline.evaluate import reference_perplexity

    result = train(tiny_base, dataset, tmp_path, _cfg(method=method, max_steps=1))
    model = load_tuned(tiny_base, result.adapter_dir)
    tokenizer = load_tokenizer(tiny_base)
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "answer": "Hello, how can I help?"},
            {"answer": "Plain text, scored as it stands and longer than the other row."}]
    # Prompt tuning's logits carry a position per virtual token before the rows' own.
    batched = reference_perplexity(model, tokenizer, rows)
    assert math.isfinite(batched) and batched > 1
    assert batched == pytest.approx(reference_perplexity(model, tokenizer, rows, batch_size=1), rel=1e-3)


@pytest.mark.parametrize("loraplus", [1.0, 4.0])
def test_resume_continues_from_the_last_checkpoint(tiny_base, dataset, tmp_path, loraplus):
    train(tiny_base, dataset, tmp_path, _cfg(max_steps=2, save_steps=1, method="lora", loraplus_lr_ratio=loraplus))
    assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir()
    logs = []
    result = train(tiny_base, dataset, tmp_path, _cfg(max_steps=4, save_steps=1, method="lora",
                                                      loraplus_lr_ratio=loraplus), resume=True, log=logs.append)
    assert any(line.startswith("resuming from") and line.endswith("checkpoint-2") for line in logs)
    assert result.steps == 4
    steps = [json.loads(line).get("step") for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps[:4] == [1, 2, 3, 4]  # the resumed state carries the first two steps' log


def test_prefix_and_prompt_tuning_train_at_their_own_learning_rate_unless_lr_is_given():
    assert configure("support-bot").train.learning_rate == 2e-3  # the recipe's, chosen for its qlora
    assert configure("support-bot", method="lora").train.learning_rate == 2e-3  # the same family
    assert configure("support-bot", method="prefix").train.learning_rate == 1e-2
    prompt = configure("support-bot", method="prompt")
    assert prompt.train.lr is None and prompt.train.learning_rate == 3e-2
    given = configure("support-bot", method="prompt", lr=5e-3)
    assert given.train.learning_rate == configure(given, method="prompt").train.learning_rate == 5e-3


def test_bad_override_names_the_option():
    with pytest.raises(AgentpeftError, match="--lr: Input should be greater than 0"):
        configure("support-bot", lr=-1.0)
    with pytest.raises(AgentpeftError, match="--method"):
        configure("support-bot", method="magic")


def test_report_to_a_missing_logger_is_a_clear_error(tiny_base, dataset, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(AgentpeftError, match="--report-to wandb needs the wandb package"):
        train(tiny_base, dataset, tmp_path, _cfg(report_to=["wandb"]))


@pytest.mark.parametrize("share_prefix", [False, True])
def test_answer_only_loss_matches_trls_loss_and_gradients(tiny_base, dataset, tmp_path, share_prefix):
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    from agentpeft.models import load_model
    from agentpeft.pipeline.trainer import AgentpeftTrainer

    rows = load_from_disk(str(dataset))["train"].select_columns(["prompt", "completion"]).select(range(6))
    tokenizer = load_tokenizer(tiny_base)
    tokenizer.padding_side = "right"
    model = get_peft_model(load_model(tiny_base), LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear",
                                                              init_lora_weights=False, task_type="CAUSAL_LM"))
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, use_cpu=True, report_to=[],
                     completion_only_loss=True, max_length=256)
    results = []
    for cls in (SFTTrainer, functools.partial(AgentpeftTrainer, answer_only=True, share_prefix=share_prefix)):
        trainer = cls(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
        model.train()
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, trainer._total_train_tokens))
    (trl_loss, trl_grads, trl_tokens), (ours, our_grads, our_tokens) = results
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-6)
    for name, grad in trl_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6)
    assert our_tokens == trl_tokens > 0


def test_anchor_kl_scores_train_only_rows_against_the_adapter_free_model(tiny_base, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig

    from agentpeft.models import load_model
    from agentpeft.pipeline.trainer import TRAIN_ONLY_INDEX, AgentpeftTrainer, with_train_only_index

    recipe = configure("support-bot")
    data = build_dataset(ingest(recipe.kb_path), ["faq", "general"], load_tokenizer(tiny_base), recipe.system_prompt,
                         tmp_path / "data", train_phrasings=1).path
    from datasets import load_from_disk

    rows = with_train_only_index(load_from_disk(str(data))["train"])
    mixed = rows.select([rows["train_only"].index(True), rows["train_only"].index(False)])
    tokenizer = load_tokenizer(tiny_base)
    tokenizer.padding_side = "right"
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, use_cpu=True, report_to=[],
                     completion_only_loss=True, max_length=256)

    def loss_of(model, dataset, kl, backward=False):
        trainer = AgentpeftTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                   answer_only=True, anchor_kl=kl)
        batch = next(iter(trainer.get_train_dataloader()))
        model.train()
        model.zero_grad()
        answer_tokens = int((batch["labels"][:, 1:] != -100).sum())
        loss = trainer.compute_loss(model, batch)
        if backward:
            loss.backward()
        return loss, answer_tokens

    def lora(init):
        return get_peft_model(load_model(tiny_base), LoraConfig(r=4, target_modules="all-linear",
                                                                 init_lora_weights=init, task_type="CAUSAL_LM"))

    columns = ["prompt", "completion", TRAIN_ONLY_INDEX]
    # A fresh adapter (B = 0) is the base: the train-only row adds no loss, only answer tokens to divide by.
    fresh = lora(True)
    kb_only = mixed.filter(lambda r: not r["train_only"]).select_columns(["prompt", "completion"])
    with_kl, n_both = loss_of(fresh, mixed.select_columns(columns), 1.0)
    ce, n_kb = loss_of(fresh, kb_only, 0.0)
    assert n_both > n_kb > 0
    torch.testing.assert_close(with_kl * n_both, ce * n_kb, rtol=1e-3, atol=1e-5)  # sums in another order
    # A moved adapter: the train-only row's KL is positive and its gradient reaches the adapter.
    moved = lora(False)
    train_only = mixed.filter(lambda r: r["train_only"]).select_columns(columns)
    kl, _ = loss_of(moved, train_only, 1.0, backward=True)
    assert kl > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in moved.named_parameters() if "lora_" in n)
    # Twice the weight, twice the loss.
    torch.testing.assert_close(loss_of(moved, train_only, 2.0)[0], 2 * kl.detach(), rtol=1e-4, atol=1e-6)
    # The base's targets are the same whether the rows' shared prompt prefix is computed once or per row.
    four = rows.filter(lambda r: r["train_only"]).select(range(4)).select_columns(columns)
    trainers = [AgentpeftTrainer(model=moved, args=args, train_dataset=four, processing_class=tokenizer,
                                 answer_only=True, anchor_kl=1.0, share_prefix=share) for share in (True, False)]
    # ... and whether the rows' positions go through the head in one call per chunk or one call per row.
    targets = [t._base_logp for t in trainers] + [trainers[1]._base_answer_log_probs(batch_size=1)]
    assert targets[0].keys() == targets[1].keys() == targets[2].keys() and len(targets[0]) == 4
    for row in targets[0]:
        torch.testing.assert_close(targets[0][row][1], targets[1][row][1], rtol=1e-3, atol=1e-5)
        # Unpadded single rows take other attention kernels: equal to fp32 rounding, not bit for bit.
        torch.testing.assert_close(targets[0][row][1], targets[2][row][1], rtol=1e-3, atol=1e-4)
    # The train stage wires it up: train-only rows carry their index through the collator.
    result = train(tiny_base, data, tmp_path / "trained", _cfg(anchor_kl=1.0, max_steps=2))
    assert result.steps == 2 and result.final_loss is not None


@pytest.mark.parametrize("attention,packed", [("sdpa", None), ("eager", None), ("sdpa", False),
                                              ("eager", "one_pass"), ("sdpa", "one_pass")])
def test_shared_prefix_forward_equals_the_full_forward(tiny_base, attention, packed):
    import torch
    from peft import LoraConfig, get_peft_model

    from agentpeft.models import load_model
    from agentpeft.pipeline.shared_prefix import prefix_groups, shared_prefix_hidden

    tokenizer = load_tokenizer(tiny_base)
    tokenizer.padding_side = "right"
    system = [{"role": "system", "content": "You answer questions about the Halcyon Desk Lamp briefly."}]
    chats = [system + [{"role": "user", "content": q}] for q in ("What is its price?", "Hi", "Does it dim?")]
    chats += [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Is it warm?")]
    chats += [[{"role": "system", "content": "Other."}, {"role": "user", "content": "Alone"}]]
    enc = tokenizer([tokenizer.apply_chat_template(c, tokenize=False) for c in chats], return_tensors="pt",
                    padding=True, add_special_tokens=False)
    groups = prefix_groups(enc["input_ids"], enc["attention_mask"])
    prefix = len(tokenizer.apply_chat_template(system, tokenize=False))  # characters: an upper bound on tokens
    assert [(rows, bool(shared)) for rows, shared in groups] == [([0, 1, 2], True), ([3], False), ([4], False),
                                                                ([5], False)]
    ids, shared = enc["input_ids"], groups[0][1]
    assert 8 <= shared <= prefix and bool((ids[:3, :shared] == ids[0, :shared]).all())
    assert bool((ids[1:3, shared] != ids[0, shared]).any())  # the longest prefix the three share
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_base), LoraConfig(r=4, target_modules="all-linear",
                                                              init_lora_weights=False, task_type="CAUSAL_LM"))
    model.train()
    trunk = model.get_base_model().model
    trunk.config._attn_implementation = attention
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(*enc["input_ids"].shape, trunk.config.hidden_size) * enc["attention_mask"][..., None]
    calls = []
    hook = trunk.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    full = trunk(**enc, use_cache=False).last_hidden_state
    shared = shared_prefix_hidden(trunk, enc["input_ids"], enc["attention_mask"], packed=packed)
    hook.remove()
    # One call for the full batch; then the system-prompt group runs its prefix and its three tails (packed
    # into one row without padding, or as padded rows; or the prefix and the packed tails as one row), and
    # the three rows that share too little run alone.
    assert len(calls) == 1 + (1 if packed == "one_pass" else 2) + 3
    real = enc["attention_mask"].bool()
    assert sorted(shape[0] for shape in calls[1:]) == ([1, 1, 1, 1, 3] if packed is False else [1] * (len(calls) - 1))
    torch.testing.assert_close(shared[real], full[real], rtol=1e-4, atol=1e-5)
    for ours, reference in zip(torch.autograd.grad((shared * weights).sum(), params),
                               torch.autograd.grad((full * weights).sum(), params)):
        # fp32 sums in another order: within 0.1% of the tensor's largest gradient (CPUs differ in kernels).
        torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))
    if packed is None:  # under bf16 autocast on a CPU the prefix and the packed tails run in one pass
        calls.clear()
        hook = trunk.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                               with_kwargs=True)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            shared_prefix_hidden(trunk, enc["input_ids"], enc["attention_mask"])
        hook.remove()
        assert sorted(shape[0] for shape in calls) == [1, 1, 1, 1]  # the prefix and the tails in one call


def test_dequantize_once_trains_the_same_adapter_as_the_4bit_path(tiny_base, dataset, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from agentpeft import models

    monkeypatch.setattr(models, "bf16_supported", lambda: False)  # bitsandbytes computes in fp32 too
    runs = {}
    for dense in (False, True):
        logs: list[str] = []
        out = tmp_path / f"dense-{dense}"
        result = train(tiny_base, dataset, out, _cfg(max_steps=3, dequantize_once=dense), log=logs.append)
        assert any("dequantized once to fp32" in line for line in logs) == dense
        assert adapter_meta(out / "adapter")["quantized_base"]
        assert result.precision == ("NF4 dequantized once to fp32 weights, fp32 compute, fp32 adapter" if dense
                                    else "NF4 4-bit weights, fp32 compute, fp32 adapter")
        assert result.device.endswith("CPU, no native bf16")
        runs[dense] = (result, load_file(out / "adapter" / "adapter_model.safetensors"))
    (nf4, nf4_weights), (dense, dense_weights) = runs[False], runs[True]
    # Without native bf16, bitsandbytes computes with the NF4 weights dequantized to fp32: the same numbers.
    assert nf4.final_loss == pytest.approx(dense.final_loss, rel=1e-4)
    assert nf4_weights.keys() == dense_weights.keys()
    for name in nf4_weights:
        torch.testing.assert_close(dense_weights[name], nf4_weights[name], rtol=1e-3, atol=1e-5)
    assert any(w.abs().sum() > 0 for n, w in dense_weights.items() if "lora_B" in n)


def test_dequantize_once_by_default_only_where_the_copy_fits(tiny_base, monkeypatch):
    import psutil

    from agentpeft import models

    count = models.parameter_count(tiny_base)
    assert count == sum(p.numel() for p in models.load_model(tiny_base).parameters())
    free = type("Mem", (), {"available": 0})
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    for native_bf16 in (False, True):  # an fp32 copy on either kind of CPU
        monkeypatch.setattr(models, "bf16_supported", lambda: native_bf16)
        free.available = 4 * 4 * count + 1
        assert models.dense_nf4_fits(tiny_base)
        free.available = 4 * 4 * count  # the copy would take a quarter
        assert not models.dense_nf4_fits(tiny_base)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_qlora_adapter_stays_fp32_on_a_cpu(native_bf16, tiny_base, dataset, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from agentpeft import models

    monkeypatch.setattr(models, "bf16_supported", lambda: native_bf16)
    result = train(tiny_base, dataset, tmp_path, _cfg(max_steps=1, dequantize_once=False))
    dtypes = {w.dtype for w in load_file(result.adapter_dir / "adapter_model.safetensors").values()}
    # TRL stores a 4-bit model's adapter in bf16, whose updates lose the small steps (docs/performance.md).
    assert dtypes == {torch.float32}


def test_bf16_computes_the_base_in_bf16_and_keeps_the_adapter_fp32(tiny_base, dataset, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        monkeypatch.setenv(name, "")  # recorded, so that the test's end restores the process environment
        monkeypatch.delenv(name)
    from agentpeft import models

    attention = []
    eager = models.eager_attention_on_cpu
    monkeypatch.setattr(models, "eager_attention_on_cpu",
                        lambda model: (eager(model), attention.append(model.config._attn_implementation)))
    runs = {}
    for bf16 in (False, True, False):
        out = tmp_path / f"bf16-{bf16}"
        # Without autocast around the trainer's own trunk and head calls, fp32 inputs meet bf16 weights and fail.
        result = train(tiny_base, dataset, out, _cfg(max_steps=2, bf16=bf16, dequantize_once=True))
        weights = load_file(out / "adapter" / "adapter_model.safetensors")
        assert {w.dtype for w in weights.values()} == {torch.float32}
        losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        # No precision leaks from one run to the next in the same process (accelerate keeps global state).
        assert runs.get(bf16, (None, losses))[1] == losses
        runs[bf16] = result, losses
    assert runs[True][0].precision == ("NF4 dequantized once to fp32 weights (linear layers copied to bf16), "
                                       "bf16 compute, fp32 adapter")
    assert runs[False][0].precision == "NF4 dequantized once to fp32 weights, fp32 compute, fp32 adapter"
    # bf16 training on a CPU bounds the matmul kernels oneDNN keeps per shape.
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == os.environ["LRU_CACHE_CAPACITY"] == "64"
    # ... and runs attention as plain matmuls (in bf16 under autocast), in the bf16 run only.
    assert attention == ["eager"]
    (fp32_losses, bf16_losses) = runs[False][1], runs[True][1]
    # The same training in another precision: close, not equal (bf16 keeps 8 significant bits).
    assert bf16_losses != fp32_losses
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.02)


def test_eager_attention_on_cpu_replaces_sdpa_only(tiny_base):
    from agentpeft.models import load_model
    from agentpeft.models import eager_attention_on_cpu

    model = load_model(tiny_base)
    assert model.config._attn_implementation == "sdpa"
    eager_attention_on_cpu(model)
    assert model.config._attn_implementation == "eager"
    assert all(layer.self_attn.config._attn_implementation == "eager" for layer in model.model.layers)
    model.set_attn_implementation("flex_attention")
    eager_attention_on_cpu(model)  # an implementation the user chose stays
    assert model.config._attn_implementation == "flex_attention"


def test_frozen_linears_to_bf16_leaves_the_adapter_head_and_4bit_layers(tiny_base):
    import torch
    from peft import LoraConfig, get_peft_model

    from agentpeft.models import frozen_linears_to_bf16, load_model

    config = LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(load_model(tiny_base), config)
    assert frozen_linears_to_bf16(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "base_layer" in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n or "norm" in n or "embed" in n} == {torch.float32}
    assert model.get_output_embeddings().weight.dtype == torch.float32
    assert not frozen_linears_to_bf16(get_peft_model(load_model(tiny_base, quantized=True), config))


def _lora_model(tiny_base, targets, dropout=0.0, bf16=False):
    """A LoRA model over the tiny base with nonzero adapters (peft starts B at zero unless told not to)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from agentpeft.models import frozen_linears_to_bf16, load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_base), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                             target_modules=targets, init_lora_weights=False,
                                                             task_type="CAUSAL_LM"))
    if bf16:
        frozen_linears_to_bf16(model)
    return model


@pytest.mark.parametrize("ratio", [1.0, 4.0])
def test_loraplus_steps_the_b_matrices_at_ratio_times_the_lr(ratio, tiny_base, dataset, tmp_path):
    from safetensors.torch import load_file

    logs = []
    train(tiny_base, dataset, tmp_path, _cfg(method="lora", max_steps=1, lr=1e-3, warmup_ratio=0.0, bf16=False,
                                             loraplus_lr_ratio=ratio), log=logs.append)
    assert any(line.startswith("LoRA+: B matrices at 4x") for line in logs) == (ratio > 1)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    # Adam's first step moves each weight with a nonzero gradient by the lr; B starts at zero and A, behind a
    # zero B, gets no gradient yet.
    b = max(w.abs().max().item() for name, w in adapter.items() if "lora_B" in name)
    assert b == pytest.approx(ratio * 1e-3, rel=1e-3)


def test_loraplus_on_prefix_tuning_is_a_clear_error(tiny_base, dataset, tmp_path):
    with pytest.raises(AgentpeftError, match="--loraplus-lr-ratio applies to qlora, lora and dora, not prefix"):
        train(tiny_base, dataset, tmp_path, _cfg(method="prefix", loraplus_lr_ratio=4.0))
    assert not any(tmp_path.iterdir())


def test_loraplus_optimizer_puts_each_a_at_the_lr_and_each_b_at_ratio_times_it(tiny_base, tmp_path):
    from types import SimpleNamespace

    from transformers import Trainer, TrainingArguments

    from agentpeft.pipeline.train import loraplus_optimizer

    model = _lora_model(tiny_base, "all-linear")
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.0, use_cpu=True,
                             report_to="none")
    trainer = SimpleNamespace(model=model, args=args, get_optimizer_cls_and_kwargs=Trainer.get_optimizer_cls_and_kwargs)
    optimizer = loraplus_optimizer(trainer, 4.0, log=lambda line: None)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(lr_of) == sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    for name, p in trainable.items():
        assert lr_of[id(p)] == pytest.approx(4e-3 if "lora_B" in name else 1e-3), name


def test_rotating_sampler_trains_every_fact_once_an_epoch_each_phrasing_in_turn():
    from agentpeft.pipeline.trainer import RotatingSampler

    facts, train_only = [[0, 1], [2, 3, 4], [5]], [6, 7]
    for lengths in (None, [5, 9, 3, 8, 2, 7, 4, 6]):
        sampler = RotatingSampler(facts, train_only, seed=3, lengths=lengths, batch_size=2)
        seen = {}
        for epoch in range(6):
            sampler.set_epoch(epoch)
            rows = list(sampler)
            assert len(rows) == len(sampler) == 5 and set(train_only) <= set(rows)
            for group in facts:
                assert len(set(rows) & set(group)) == 1  # one phrasing of each fact
            seen[epoch] = rows
        # Over 6 epochs the 2-phrasing fact trains each phrasing 3 times, the 3-phrasing one each twice.
        assert sorted(r for rows in seen.values() for r in rows if r < 2) == [0, 0, 0, 1, 1, 1]
        assert sorted(r for rows in seen.values() for r in rows if 2 <= r < 5) == [2, 2, 3, 3, 4, 4]
        sampler.set_epoch(4)  # a resumed run asks for an epoch again and gets the same rows in the same order
        assert list(sampler) == seen[4]
    offsets = {tuple(RotatingSampler([[0, 1]] * 20, [], seed=s).offsets) for s in range(3)}
    assert len(offsets) == 3 and all(0 < sum(o) < 20 for o in offsets)  # seeded, and not every fact starts alike


def test_rotate_phrasings_trains_an_epoch_of_one_phrasing_per_fact(tiny_base, tmp_path, monkeypatch):
    from datasets import load_from_disk
    from agentpeft.pipeline import train as train_module
    from agentpeft.pipeline import trainer as trainer_module

    recipe = configure("support-bot")
    data = build_dataset(ingest(recipe.kb_path), ["faq", "facts", "general"], load_tokenizer(tiny_base),
                         recipe.system_prompt, tmp_path / "data", train_phrasings=2).path
    rows = load_from_disk(str(data))["train"]
    facts, train_only = train_module.phrasing_rotation(rows)
    assert train_only and all(rows[i]["train_only"] for i in train_only)
    assert len(facts) < len(rows) - len(train_only) and all(len({rows[i]["fact_id"] for i in g}) == 1 for g in facts)
    epochs_fed = []
    iterate = trainer_module.RotatingSampler.__iter__
    monkeypatch.setattr(trainer_module.RotatingSampler, "__iter__",
                        lambda self: (epochs_fed.append(self.epoch), iterate(self))[1])
    logs = []
    result = train(tiny_base, data, tmp_path / "out", _cfg(method="lora", max_steps=-1, epochs=2, batch_size=16,
                                                           rotate_phrasings=True), log=logs.append)
    assert f"each epoch trains {len(facts) + len(train_only)} of the {len(rows)} rows" in "\n".join(logs)
    assert result.steps == 2 * -(-(len(facts) + len(train_only)) // 16)
    assert epochs_fed == [0, 1]
    with pytest.raises(AgentpeftError, match="rotate_phrasings needs the dataset's fact_id column"):
        train_module.phrasing_rotation(rows.remove_columns("fact_id"))


def test_batches_of_long_rows_run_as_micro_batches_with_the_same_batch():
    from agentpeft.pipeline.train import micro_batched

    cfg = _cfg(batch_size=8, grad_accum=1)
    assert cfg.micro_batch_tokens == 1024
    logs: list[str] = []
    assert micro_batched(cfg, 1024 // 8, logs.append) is cfg and not logs  # short rows: unchanged
    long = micro_batched(cfg, 300, logs.append)
    assert (long.batch_size, long.grad_accum) == (2, 4) and long.batch_size * 300 <= 1024
    assert long.batch_size * long.grad_accum == 8 and "4 micro-batches of 2" in logs[0]
    assert micro_batched(_cfg(batch_size=6, grad_accum=2), 5000).batch_size == 1  # a single row over the budget
    assert micro_batched(_cfg(batch_size=6, grad_accum=2), 5000).grad_accum == 12
    assert micro_batched(_cfg(micro_batch_tokens=0), 5000).batch_size == 4  # 0: off
