"""Exports: hf copies, GGUF files that load back with the merged model's logits and replies, Ollama Modelfiles,
the system prompt in the chat templates, and merged/ stored in bf16 (fp32 on request)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner
from conftest import one_line_error as _one_line_error

QUESTIONS = ["What is your return policy?", "How do I reset my device?", "Where is my order?"]


@pytest.fixture
def reg(registered, monkeypatch):
    monkeypatch.setenv("AGENTPEFT_HOME", str(registered["home"]))
    return registered["home"] / "registry"


def _merged(reg):
    from agentpeft.models import load_model, load_tokenizer

    folder = reg / "support-bot" / "1" / "merged"
    return load_model(folder), load_tokenizer(folder)


def _gguf(folder, name="model.gguf"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    return model, tokenizer


def _prompts(system_prompt: str) -> list[list[dict]]:
    from agentpeft.models import chat_prompt

    return [chat_prompt(system_prompt, q) for q in QUESTIONS]


def test_gguf_export_round_trips_the_merged_model(reg, tmp_path):
    import torch

    import agentpeft
    from agentpeft.models import generate

    out = agentpeft.export("support-bot@1", tmp_path / "gguf", format="gguf")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter", "manifest.json", "model.gguf"]
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "--lora-modules support-bot=./adapter" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".gguf.export-*"))

    system = json.loads((out / "manifest.json").read_text())["system_prompt"]
    merged, merged_tok = _merged(reg)
    model, tok = _gguf(out)
    # The same tokens for the same chat, and the template gives the system prompt when the chat has none.
    for chat in _prompts(system):
        text = merged_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
        assert tok.apply_chat_template(chat[1:], tokenize=False, add_generation_prompt=True) == text
        assert tok(text, add_special_tokens=False)["input_ids"] == merged_tok(text, add_special_tokens=False)["input_ids"]
    texts = [merged_tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in _prompts(system)]
    batch = merged_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        want, got = merged(**batch).logits, model(**batch).logits
    mask = batch["attention_mask"].bool()
    # merged/ holds bf16 weights, which f16 represents exactly: only f16's smallest values round.
    assert (want - got).abs()[mask].max().item() < 1e-3 * max(1.0, want.abs().max().item())
    replies = generate(model, tok, _prompts(system), max_new_tokens=12)
    assert replies == generate(merged, merged_tok, _prompts(system), max_new_tokens=12)


def test_q8_0_export_reads_with_gguf_and_loads(reg, tmp_path):
    import gguf
    import torch

    from agentpeft.cli import cli

    result = CliRunner().invoke(cli, ["export", "support-bot", str(tmp_path / "q8"), "--format", "gguf",
                                      "--quant", "q8_0"])
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(str(tmp_path / "q8" / "model.gguf"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied to the embeddings, as in the checkpoint
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    system = json.loads((tmp_path / "q8" / "manifest.json").read_text())["system_prompt"]
    assert system in fields["tokenizer.chat_template"].contents()
    # Smaller than f16 and still the same model, to int8's precision.
    merged, merged_tok = _merged(reg)
    model, _ = _gguf(tmp_path / "q8")
    batch = merged_tok([merged_tok.apply_chat_template(_prompts(system)[0], tokenize=False,
                                                       add_generation_prompt=True)], return_tensors="pt")
    with torch.inference_mode():
        want, got = merged(**batch).logits, model(**batch).logits
    assert (want - got).abs().max().item() < 0.05 * max(1.0, want.abs().max().item())


def test_gguf_runs_in_llama_cpp(reg, tmp_path):
    """The GGUF as llama.cpp reads it: the same tokens and the same greedy reply as transformers."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (PyPI carries only its source, whose install compiles "
                            "llama.cpp); the transformers round trip covers the file")
    from agentpeft.models import generate

    out = tmp_path / "gguf"
    from agentpeft.registry import export

    export("support-bot@1", out, format="gguf", quant="f32")
    merged, merged_tok = _merged(reg)
    system = json.loads((out / "manifest.json").read_text())["system_prompt"]
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=512, verbose=False)
    for chat, reply in zip(_prompts(system), generate(merged, merged_tok, _prompts(system), max_new_tokens=8)):
        text = merged_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = merged_tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        tokens = []
        for token in llm.generate(ids, temp=0.0, top_k=1):
            if token == llm.token_eos() or len(tokens) == 8:
                break
            tokens.append(token)
        assert merged_tok.decode(tokens, skip_special_tokens=True).strip() == reply


def test_ollama_export_writes_a_modelfile(reg, tmp_path):
    from agentpeft.cli import cli
    from agentpeft.gguf_export import OLLAMA_CHATML, chatml_problem

    result = CliRunner().invoke(cli, ["export", "support-bot@1", str(tmp_path / "ollama"), "--format", "ollama"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "ollama"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "adapter", "manifest.json", "model.gguf"]
    system = json.loads((out / "manifest.json").read_text())["system_prompt"]
    text = (out / "Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./model.gguf" in lines
    assert f'SYSTEM """{system}"""' in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|im_start|>"' in lines
    assert "PARAMETER temperature 0" in lines
    assert f'TEMPLATE """{OLLAMA_CHATML}"""' in text
    assert "ollama create support-bot -f Modelfile" in (out / "README.md").read_text()
    # The Modelfile's template is ChatML, which the model's own chat template is.
    _, tokenizer = _merged(reg)
    assert chatml_problem(tokenizer) is None


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("").Option("missingkey=zero").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""


def _modelfile_string(text: str, command: str) -> str:
    start = text.index(f'{command} """') + len(command) + 4
    return text[start:text.index('"""', start)]


@pytest.mark.skipif(not shutil.which("go"), reason="needs Go to run the Modelfile's template as Ollama does "
                                                     "(Go's text/template)")
def test_modelfile_template_renders_as_the_chat_template(reg, tmp_path):
    """Ollama runs TEMPLATE with Go's text/template over the chat, SYSTEM first when the chat has no system
    message: the prompt it builds is the one the model's own chat template builds."""
    import subprocess

    from agentpeft.registry import export

    out = export("support-bot@1", tmp_path / "ollama", format="ollama")
    text = (out / "Modelfile").read_text()
    template, system = _modelfile_string(text, "TEMPLATE"), _modelfile_string(text, "SYSTEM")
    (tmp_path / "render.go").write_text(GO_RENDER)
    _, tokenizer = _merged(reg)
    chats = [[{"role": "user", "content": "Hi"}],
             [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
              {"role": "user", "content": 'Q2 with "quotes", {{ braces }} and\na newline'}]]
    for chat in chats:
        asked = [{"role": "system", "content": system}, *chat]
        go = subprocess.run(["go", "run", str(tmp_path / "render.go")], input=json.dumps(
            {"template": template, "messages": asked}), capture_output=True, text=True, timeout=300,
            env={**os.environ, "GOCACHE": str(tmp_path / "gocache")})
        assert go.returncode == 0, go.stderr
        assert go.stdout == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_export_refuses_bad_requests_in_one_line(reg, tmp_path):
    from agentpeft.cli import cli

    runner = CliRunner()
    _one_line_error(runner.invoke(cli, ["export", "support-bot", str(tmp_path / "a"), "--format", "onnx"]),
                    "unknown export format 'onnx'", "hf, gguf, ollama")
    _one_line_error(runner.invoke(cli, ["export", "support-bot", str(tmp_path / "a"), "--quant", "q8_0"]),
                    "--quant applies to --format gguf and ollama")
    _one_line_error(runner.invoke(cli, ["export", "support-bot", str(tmp_path / "a"), "--format", "gguf",
                                        "--quant", "q4_k"]), "unknown GGUF quant 'q4_k'", "q8_0")
    _one_line_error(runner.invoke(cli, ["export", "prompt-bot", str(tmp_path / "a"), "--format", "gguf"]),
                    "prompt-bot@1 has no merged weights", "--format hf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    _one_line_error(runner.invoke(cli, ["export", "support-bot", str(tmp_path / "full"), "--format", "ollama"]),
                    "is not empty")
    assert not (tmp_path / "a").exists() and [p.name for p in tmp_path.iterdir()] == ["full"]


def test_unsupported_architecture_fails_in_one_line_and_leaves_nothing(reg, tmp_path, monkeypatch):
    from agentpeft import gguf_export
    from agentpeft.cli import cli

    real = gguf_export.write_gguf

    def as_mistral(folder, *args, **kwargs):
        copy = tmp_path / "mistral"
        shutil.copytree(folder, copy)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "model_type": "mistral",
                                                      "architectures": ["MistralForCausalLM"]}))
        return real(copy, *args, **kwargs)

    monkeypatch.setattr(gguf_export, "write_gguf", as_mistral)
    out = tmp_path / "out"
    _one_line_error(CliRunner().invoke(cli, ["export", "support-bot", str(out), "--format", "gguf"]),
                    "supports the Llama architecture (LlamaForCausalLM), not MistralForCausalLM", "--format hf")
    assert not out.exists() and not list(tmp_path.glob(".out.export-*"))


def test_bpe_pre_tokenizers_llama_cpp_names():
    from agentpeft.gguf_export import bpe_pre_tokenizer

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    bpe = {"model": {"type": "BPE"}, "normalizer": None, "decoder": {"type": "ByteLevel"}}
    assert bpe_pre_tokenizer({**bpe, "pre_tokenizer": byte_level}) == "gpt-2"
    assert bpe_pre_tokenizer({**bpe, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}}) == "smollm"
    assert bpe_pre_tokenizer({**bpe, "pre_tokenizer": {"type": "Metaspace"}}) is None
    assert bpe_pre_tokenizer({**bpe, "model": {"type": "Unigram"}, "pre_tokenizer": byte_level}) is None


# --- the system prompt in the chat template ----------------------------------------------------------
def test_merged_tokenizer_defaults_to_the_system_prompt(reg):
    from transformers import AutoTokenizer

    manifest = json.loads((reg / "support-bot" / "1" / "manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(reg / "support-bot" / "1" / "merged"))
    user = [{"role": "user", "content": "Hello?"}]
    plain = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert plain == tokenizer.apply_chat_template(
        [{"role": "system", "content": manifest["system_prompt"]}, *user], tokenize=False, add_generation_prompt=True)
    own = tokenizer.apply_chat_template([{"role": "system", "content": "Be terse."}, *user], tokenize=False)
    assert "Be terse." in own and manifest["system_prompt"] not in own


@pytest.mark.parametrize("prompt", ['Say "hi" \\ back.\nTwo lines, an emoji 🙂, {{ braces }} and %} tags.', "plain"])
def test_default_system_template_renders_any_prompt_and_replaces_itself(tiny_base, prompt):
    from transformers import AutoTokenizer

    from agentpeft.pipeline.merge import with_default_system

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    original = tokenizer.chat_template
    tokenizer.chat_template = with_default_system(with_default_system(original, "an older prompt"), prompt)
    user = [{"role": "user", "content": "Q"}]
    assert tokenizer.apply_chat_template(user, tokenize=False) == \
        f"<|im_start|>system\n{prompt}<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
    assert tokenizer.chat_template.count("agentpeft: default system prompt") == 1
    assert with_default_system(tokenizer.chat_template, "") == original


# --- merged/ dtype -----------------------------------------------------------------------------------
def test_merged_is_stored_in_bf16_by_default(reg):
    from safetensors import safe_open

    from agentpeft.registry import show

    entry = reg / "support-bot" / "1"
    with safe_open(str(entry / "merged" / "model.safetensors"), "pt") as fh:
        assert {str(fh.get_slice(k).get_dtype()) for k in fh.keys()} == {"BF16"}
    merge = show("support-bot@1")["merge"]
    assert merge["dtype"] == "bf16" and merge["max_logit_diff"] <= merge["tolerance"]
    assert 0 <= merge["stored_logit_diff"] < 0.1
    assert "stored in bf16" in (entry / "README.md").read_text()


def test_merge_dtype_fp32_on_request(reg, tiny_base, tmp_path):
    import torch

    from agentpeft.models import load_model
    from agentpeft.pipeline.merge import merge

    result = merge(tiny_base, reg / "support-bot" / "1" / "adapter", tmp_path / "merged", "Be brief.", dtype="fp32")
    assert result.dtype == "fp32" and result.stored_logit_diff == 0.0 and "stored in fp32" in result.summary()
    assert load_model(tmp_path / "merged").dtype == torch.float32
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float32"


def test_merge_dtype_option_is_validated():
    from agentpeft.errors import AgentpeftError
    from agentpeft.recipe import configure

    assert configure("support-bot", merge_dtype="fp16").merge.dtype == "fp16"
    assert configure("support-bot").merge.dtype == "bf16"
    with pytest.raises(AgentpeftError, match="^--merge-dtype: "):
        configure("support-bot", merge_dtype="fp8")
