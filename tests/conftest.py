"""Shared fixtures: an isolated AGENTPEFT_HOME and a tiny random-init Llama base built offline."""

from __future__ import annotations

from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh AGENTPEFT_HOME for one test."""
    monkeypatch.setenv("AGENTPEFT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make_tiny_base(folder: Path) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained on the sample knowledge base."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [p.read_text() for p in (ROOT / "recipes").rglob("*.md")] + ["What is the capital of France? Paris."]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny-base"))


def build_tiny(tiny_base: Path, name: str, recipe=None, **overrides):
    """Register a recipe (support-bot by default) trained a few steps on the tiny base, with a cheap evaluation."""
    from agentpeft.pipeline.build import build
    from agentpeft.recipe import get_recipe

    recipe = recipe or get_recipe("support-bot")
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(
        update={"max_new_tokens": 2, "forgetting_probe": False})})
    return build(recipe, base=str(tiny_base), name=name, allow_regression=True, show_progress=False,
                 log=lambda s: None, **overrides)


@pytest.fixture(scope="session")
def registered(tiny_base, tmp_path_factory):
    """A registry (AGENTPEFT_HOME) holding support-bot@1, a QLoRA build merged, and prompt-bot@1, prompt tuning."""
    home = tmp_path_factory.mktemp("registered-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("AGENTPEFT_HOME", str(home))
    merged = build_tiny(tiny_base, "support-bot", max_steps=2)
    prompt = build_tiny(tiny_base, "prompt-bot", max_steps=1, method="prompt", virtual_tokens=4)
    mp.undo()
    return {"home": home, "merged": merged, "prompt": prompt}
