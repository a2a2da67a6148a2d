"""Batched greedy generation (agentpeft.models.generate) on a tiny random model."""

from __future__ import annotations

import os

import pytest

from agentpeft.models import chat_prompt, generate, load_model, load_tokenizer

SYSTEM = "You answer questions about the Halcyon Desk Lamp briefly and politely."
QUESTIONS = ["What is its price?", "Hi", "Does it dim when the room gets dark at night?", "Warranty?",
             "How many watts does the bulb draw?"]


def _model(tiny_base):
    """The tiny base with its weights stirred: as saved, its tied embeddings make it repeat a special token."""
    import torch

    torch.manual_seed(0)
    model = load_model(tiny_base)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    return model, load_tokenizer(tiny_base)


def _padded_whole_prompts(model, tokenizer, prompts, max_new_tokens):
    """The reference: every prompt left-padded whole, one `generate` call, no shared cache."""
    import torch

    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, enc["input_ids"].shape[1]:]]


@pytest.mark.parametrize("system", [SYSTEM, None])
def test_shared_prefix_generation_gives_the_replies_of_whole_padded_prompts(tiny_base, system):
    model, tokenizer = _model(tiny_base)
    prompts = [chat_prompt(system, q) for q in QUESTIONS]
    calls = []
    hook = model.model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                                 with_kwargs=True)
    ours = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=len(prompts))
    hook.remove()
    assert ours == _padded_whole_prompts(model, tokenizer, prompts, 12)
    assert all(ours)
    # With the system prompt, the shared prefix ran once, alone (a batch of one row), before the batch.
    assert (calls[0][0] == 1) == (system is not None)


def test_settled_rows_stop_early_and_keep_their_reply_so_far(tiny_base):
    model, tokenizer = _model(tiny_base)
    prompts = [chat_prompt(SYSTEM, q) for q in QUESTIONS]
    full = generate(model, tokenizer, prompts, max_new_tokens=12)
    seen = []

    def settled(i, reply):
        seen.append(i)
        return i % 2 == 0 and len(reply) >= 3

    cut = generate(model, tokenizer, prompts, max_new_tokens=12, settled=settled)
    assert set(seen) == set(range(len(prompts)))
    for i, (short, whole) in enumerate(zip(cut, full)):
        if i % 2:
            assert short == whole
        else:
            assert whole.startswith(short) and len(short) >= 3
    assert any(len(short) < len(whole) for short, whole in zip(cut, full))


_SHAPES = """
import sys, psutil, torch
from agentpeft.models import bound_onednn_caches
if sys.argv[1] == "bounded":
    bound_onednn_caches()
w = torch.randn(1536, 576, dtype=torch.bfloat16)
torch.nn.functional.linear(torch.randn(8, 576, dtype=torch.bfloat16), w)
start = psutil.Process().memory_info().rss
for rows in range(50, 250):  # a new matmul shape each time, as batches of varying token counts give
    torch.nn.functional.linear(torch.randn(rows, 576, dtype=torch.bfloat16), w) @ w
print((psutil.Process().memory_info().rss - start) / 2**20)
"""


def test_bounded_onednn_caches_keep_bf16_matmul_memory_flat_over_many_shapes():
    import subprocess
    import sys

    from agentpeft.models import cpu_bf16_supported

    if not cpu_bf16_supported():
        pytest.skip("this CPU has no native bf16: training computes in fp32 here and bounds no oneDNN caches")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    growth = {mode: float(subprocess.run([sys.executable, "-c", _SHAPES, mode], env=env, capture_output=True,
                                         text=True, check=True).stdout.split()[-1]) for mode in ("default", "bounded")}
    assert growth["default"] > 100  # MiB: oneDNN's default caches keep a kernel for each of the 200 shapes
    assert growth["bounded"] < growth["default"] / 3


def _logits(model, tokenizer, text="What is its price?"):
    import torch

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def test_for_inference_computes_in_bf16_where_the_hardware_has_it(tiny_base, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model

    from agentpeft import models

    monkeypatch.delenv(models.INFERENCE_DTYPE_ENV, raising=False)
    monkeypatch.setattr(models, "cpu_bf16_supported", lambda: True)
    model, tokenizer = _model(tiny_base)
    reference = _logits(model, tokenizer)
    autocast, _ = _model(tiny_base)  # plain autocast over the fp32 weights: it casts each weight in every call
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_logits = _logits(autocast, tokenizer)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as saved
    assert models.for_inference(model) is model
    linear = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert model.get_output_embeddings() in linear and {m.weight.dtype for m in linear} == {torch.bfloat16}
    # The head holds a bf16 copy of the tied embeddings, which keep fp32 for the lookup, as the norms do.
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert {p.dtype for n, p in model.named_parameters() if "norm" in n} == {torch.float32}
    bf16 = _logits(model, tokenizer)
    assert torch.equal(bf16, autocast_logits)  # stored bf16 weights: autocast's own rounding, done once
    assert not torch.equal(bf16, reference)
    assert torch.allclose(bf16, reference, atol=0.05 * reference.abs().max().item())
    models.for_inference(model)  # once is enough: a second call changes nothing
    assert torch.equal(_logits(model, tokenizer), bf16)
    assert len(generate(model, tokenizer, [chat_prompt(SYSTEM, q) for q in QUESTIONS], 6)) == len(QUESTIONS)
    # An unmerged adapter: the base's layers and the adapter's go bf16 under the peft wrapper.
    torch.manual_seed(0)
    tuned = get_peft_model(_model(tiny_base)[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    tuned_reference = _logits(tuned, tokenizer)
    models.for_inference(tuned)
    assert torch.allclose(_logits(tuned, tokenizer), tuned_reference, atol=0.05 * tuned_reference.abs().max().item())


def test_for_inference_leaves_fp32_without_native_bf16_or_when_told(tiny_base, monkeypatch):
    import torch

    from agentpeft import models
    from agentpeft.errors import AgentpeftError

    for native, setting in ((False, None), (True, "float32")):
        monkeypatch.setattr(models, "cpu_bf16_supported", lambda: native)
        if setting:
            monkeypatch.setenv(models.INFERENCE_DTYPE_ENV, setting)
        model, tokenizer = _model(tiny_base)
        reference = _logits(model, tokenizer)
        models.for_inference(model)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert torch.equal(_logits(model, tokenizer), reference)
        assert models.inference_precision() == "fp32"
    monkeypatch.setenv(models.INFERENCE_DTYPE_ENV, "fp8")
    with pytest.raises(AgentpeftError, match="AGENTPEFT_INFERENCE_DTYPE='fp8' is not understood; set it to auto"):
        models.for_inference(model)


def test_a_model_set_up_for_inference_is_freed_with_its_last_reference(tiny_base, monkeypatch):
    import gc
    import weakref

    from agentpeft import models

    monkeypatch.delenv(models.INFERENCE_DTYPE_ENV, raising=False)
    monkeypatch.setattr(models, "cpu_bf16_supported", lambda: True)
    model = models.for_inference(load_model(tiny_base))
    assert model._agentpeft_bf16
    ref = weakref.ref(model)
    gc.disable()  # freed by reference counting, not left for the cycle collector (the evaluate stage loads two)
    try:
        del model
        assert ref() is None
    finally:
        gc.enable()


def test_for_inference_moves_a_cpu_model_to_the_gpu_where_there_is_one(tiny_base, monkeypatch):
    import torch

    from agentpeft import models

    monkeypatch.setenv(models.INFERENCE_DTYPE_ENV, "float32")
    model, moved = load_model(tiny_base), []
    monkeypatch.setattr(model, "to", lambda device: moved.append(device) or model)  # no GPU here: record the move
    models.for_inference(model)
    assert moved == []  # no GPU: it stays
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.for_inference(model) is model and moved == ["cuda"]
