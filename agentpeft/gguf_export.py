"""GGUF and Ollama exports of a registered model: the merged weights as one GGUF file for llama.cpp and Ollama.

The file follows llama.cpp's own conversion (convert_hf_to_gguf.py) for the Llama architecture: its tensor
names (``gguf.TensorNameMap``), the query and key rows reordered for its rotary embedding, norms in f32,
the tokenizer as a byte-level BPE vocabulary with its merges, special tokens and chat template. It is
written with ``gguf`` (gguf-py), the library llama.cpp maintains for reading and writing the format.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .errors import AgentpeftError

FORMATS = ("hf", "gguf", "ollama")
#: Tensor types of a GGUF export (``--quant``): 2-D weights take it, norms and other 1-D tensors stay f32.
QUANTS = ("f16", "bf16", "q8_0", "f32")
DEFAULT_QUANT = "f16"
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"

#: Llama 3's pre-tokenizer split, as its tokenizer.json writes it (llama.cpp's "llama-bpe").
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

#: ChatML in Ollama's Go template syntax: every message as ``<|im_start|>ROLE\nCONTENT<|im_end|>\n``, then
#: the assistant's turn opened, as the Jinja ChatML templates render a conversation with the generation prompt.
#: Ollama passes the Modelfile's SYSTEM as the first message when a request brings no system message.
OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
CHATML_STOPS = ("<|im_start|>", "<|im_end|>")


def _quant_types():
    import gguf

    q = gguf.GGMLQuantizationType
    f = gguf.LlamaFileType
    return {"f32": (q.F32, f.ALL_F32), "f16": (q.F16, f.MOSTLY_F16), "bf16": (q.BF16, f.MOSTLY_BF16),
            "q8_0": (q.Q8_0, f.MOSTLY_Q8_0)}


def check_options(fmt: str, quant: str | None) -> str | None:
    """The quant an export writes (None for hf); a one-line error for an unknown format or quant."""
    if fmt not in FORMATS:
        raise AgentpeftError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)} (--format)")
    if fmt == "hf":
        if quant is not None:
            raise AgentpeftError("--quant applies to --format gguf and ollama; an hf export copies the registered "
                                 "files as they are, so drop --quant")
        return None
    quant = DEFAULT_QUANT if quant is None else str(quant).lower()
    if quant not in QUANTS:
        raise AgentpeftError(f"unknown GGUF quant {quant!r}; use one of {', '.join(QUANTS)} (--quant)")
    return quant


def _byte_level(step: dict, regex: bool = True) -> bool:
    return (step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == regex
            and not step.get("add_prefix_space", False))


def bpe_pre_tokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a byte-level BPE tokenizer's pre-tokenizer, read from its
    tokenizer.json; None for another kind of tokenizer or a split llama.cpp has no name for."""
    model, pre = tokenizer_json.get("model") or {}, tokenizer_json.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or tokenizer_json.get("normalizer") or (tokenizer_json.get("decoder") or {}).get(
            "type") != "ByteLevel":
        return None
    if _byte_level(pre):
        return "gpt-2"  # GPT-2's split, which ByteLevel applies with use_regex
    steps = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and _byte_level(steps[1]):
        return "smollm"  # each digit alone, then GPT-2's split
    if len(steps) == 2 and steps[0].get("type") == "Split" and (steps[0].get("pattern") or {}).get(
            "Regex") == _LLAMA3_SPLIT and _byte_level(steps[1], regex=False):
        return "llama-bpe"
    return None


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and their llama.cpp types, by id, as convert_hf_to_gguf.py lists a BPE vocabulary."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise AgentpeftError(f"the tokenizer has token id {max(by_id)}, past the model's vocab_size {vocab_size}; "
                             "the merged checkpoint is inconsistent, so rebuild the model")
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = decoder[i].special if i in decoder else False
            looks = token.startswith("<|") and token.endswith("|>")
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special or looks else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _permute(weights, n_head: int):
    """Query or key rows from transformers' rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _check_llama(config) -> dict:
    """The rope settings of a Llama config that llama.cpp's llama architecture runs as is; an error otherwise."""
    archs = list(getattr(config, "architectures", None) or [])
    if config.model_type != "llama" or archs not in ([], ["LlamaForCausalLM"]):
        what = archs[0] if archs else config.model_type
        raise AgentpeftError(f"GGUF export supports the Llama architecture (LlamaForCausalLM), not {what}; export "
                             "with --format hf and convert merged/ with llama.cpp's convert_hf_to_gguf.py")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "linear"):
        raise AgentpeftError(f"GGUF export does not write {kind!r} rope scaling; export with --format hf and "
                             "convert merged/ with llama.cpp's convert_hf_to_gguf.py")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    return {"type": kind, "factor": rope.get("factor"), "theta": 10000.0 if theta is None else float(theta)}


def write_gguf(folder: str | Path, out: str | Path, quant: str = DEFAULT_QUANT, system_prompt: str | None = None,
               name: str | None = None, description: str | None = None) -> Path:
    """Write the transformers checkpoint ``folder`` (a Llama with a byte-level BPE tokenizer) as the GGUF
    file ``out``: 2-D weights in ``quant`` (f16, bf16, q8_0 or f32), norms in f32, the tokenizer and its chat
    template embedded, that template giving ``system_prompt`` as the system message of a chat that has none."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from .pipeline.merge import with_default_system

    folder, out = Path(folder), Path(out)
    tensor_type, file_type = _quant_types()[check_options("gguf", quant)]
    config = AutoConfig.from_pretrained(str(folder))
    rope = _check_llama(config)
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")) \
        if (folder / "tokenizer.json").is_file() else {}
    pre = bpe_pre_tokenizer(tokenizer_json)
    if pre is None:
        raise AgentpeftError(f"GGUF export writes byte-level BPE tokenizers (GPT-2, SmolLM and Llama 3 style); "
                             f"{folder}/tokenizer.json is another kind; export with --format hf and convert with "
                             "llama.cpp's convert_hf_to_gguf.py")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head

    logging.getLogger("gguf").setLevel(logging.WARNING)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    if name:
        writer.add_name(name)
    if description:
        writer.add_description(description)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope["theta"])
    if rope["type"] == "linear" and rope["factor"]:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types = _vocab(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=config.vocab_size)
    # What the transformers tokenizer does, not what its files suggest: the ids of its special tokens,
    # whether encoding adds BOS or EOS, and the chat template with the model's system prompt.
    special.special_token_ids = {kind: i for kind in ("bos", "eos", "unk", "pad")
                                 if (i := getattr(tokenizer, f"{kind}_token_id", None)) is not None}
    sample = tokenizer("a")["input_ids"]
    special.add_special_token = {
        "bos": tokenizer.bos_token_id is not None and sample[:1] == [tokenizer.bos_token_id],
        "eos": tokenizer.eos_token_id is not None and sample[-1:] == [tokenizer.eos_token_id]}
    template = tokenizer.chat_template
    special.chat_template = with_default_system(template, system_prompt or "") if isinstance(template, str) \
        else template
    special.add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise AgentpeftError(f"{folder} has no safetensors weights to write as GGUF; rebuild the model")
    for file in files:
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():
                if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise AgentpeftError(f"GGUF export has no llama.cpp name for tensor {key!r} of {file.name}; "
                                         "export with --format hf")
                data = fh.get_tensor(key).to(torch.float32)
                if key.endswith(("q_proj.weight", "q_proj.bias")):
                    data = _permute(data, n_head)
                elif key.endswith(("k_proj.weight", "k_proj.bias")):
                    data = _permute(data, n_kv)
                array = data.numpy()
                kind = tensor_type if array.ndim > 1 and not target.endswith("_norm.weight") \
                    else gguf.GGMLQuantizationType.F32
                try:
                    packed = gguf.quants.quantize(array, kind)
                except gguf.QuantError:  # rows not a multiple of the block size: f16, as llama.cpp does
                    kind = gguf.GGMLQuantizationType.F16
                    packed = gguf.quants.quantize(array, kind)
                if kind == gguf.GGMLQuantizationType.F16 and not np.isfinite(packed).all():
                    raise AgentpeftError(f"tensor {key} overflows f16; export with --quant bf16 or f32")
                writer.add_tensor(target, packed, raw_dtype=kind)
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def chatml_problem(tokenizer) -> str | None:
    """Why ``tokenizer``'s chat template is not ChatML as ``OLLAMA_CHATML`` renders it; None when it is."""
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    want = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat) + "<|im_start|>assistant\n"
    try:
        got = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template that fails on a plain chat
        return f"its chat template fails on a plain chat ({type(exc).__name__})"
    return None if got == want else "its chat template is not ChatML"


def modelfile(system_prompt: str | None, title: str) -> str:
    """An Ollama Modelfile for ``model.gguf`` beside it: ChatML, the system prompt, greedy decoding."""
    lines = [f"# {title}", "# Create the model with: ollama create NAME -f Modelfile", f"FROM ./{GGUF_FILE}",
             f'TEMPLATE """{OLLAMA_CHATML}"""']
    if system_prompt:
        if '"""' in system_prompt:
            raise AgentpeftError('the system prompt holds """, which a Modelfile cannot quote; export with '
                                 "--format gguf, whose chat template carries it")
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in CHATML_STOPS]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def usage(name: str, fmt: str, quant: str, manifest: dict) -> str:
    """The README section of a GGUF or Ollama export: its files and how to run them."""
    modelfile_line = "\n- `Modelfile`: the Ollama model definition." if fmt == "ollama" else ""
    qlora = (" with 4-bit (NF4) base weights, so applied to full-precision base weights its replies can differ "
             "slightly from the merged model's" if manifest["train"]["config"].get("method") == "qlora" else "")
    ollama = (f"""
Ollama: `ollama create {name} -f Modelfile`, then `ollama run {name}`. The Modelfile's TEMPLATE is ChatML, its
SYSTEM the model's system prompt, and it decodes greedily (temperature 0) as the evaluation did.
""" if fmt == "ollama" else "")
    retrieval = ("""
This model was trained and evaluated with retrieved knowledge-base passages in its prompts; `load_llm` adds
them, a GGUF runtime does not, so put the passages into the question yourself (agentpeft's `kb_search`).
""" if (manifest.get("retrieval") or {}).get("enabled") is True else "")
    return f"""
## This export

- `{GGUF_FILE}`: the merged model for llama.cpp and Ollama, 2-D weights in {quant}, norms in f32, with the
  tokenizer and chat template embedded; the template puts the model's system prompt first when a chat
  brings no system message.{modelfile_line}
- `adapter/`: the peft adapter alone, for servers that apply adapters to a base model they hold, e.g.
  `vllm serve BASE --enable-lora --lora-modules {name}=./adapter` (vLLM serves LoRA, not DoRA or prompt
  adapters). It was trained on `{manifest['base_model']['name']}`{qlora}.
- `manifest.json`: the registry manifest (metrics, recipe, training settings).

llama.cpp: `llama-cli -m {GGUF_FILE} -cnv` or `llama-server -m {GGUF_FILE} --jinja`.
{ollama}{retrieval}"""


def write_package(entry: Path, manifest: dict, out: Path, fmt: str, quant: str | None) -> Path:
    """Fill the new folder ``out`` with the GGUF (or Ollama) export of the registry version ``entry``."""
    quant = check_options(fmt, quant)
    name = f"{manifest['name']}@{manifest['version']}"
    if not (entry / "merged").is_dir():
        method = manifest.get("train", {}).get("config", {}).get("method", "unmerged")
        raise AgentpeftError(f"{name} has no merged weights (a {method} adapter is used as base + adapter), so it "
                             "cannot be written as GGUF; export it with --format hf")
    system_prompt = manifest.get("system_prompt") or ""
    text = None
    if fmt == "ollama":
        from transformers import AutoTokenizer

        problem = chatml_problem(AutoTokenizer.from_pretrained(str(entry / "merged")))
        if problem:
            raise AgentpeftError(f"the Ollama export writes a ChatML template, but {name}'s base does not chat in "
                                 f"ChatML ({problem}); export with --format gguf, whose file embeds the template")
        text = modelfile(system_prompt, f"{name}, exported by agentpeft")
    out.mkdir(parents=True)
    write_gguf(entry / "merged", out / GGUF_FILE, quant, system_prompt, name=manifest["name"],
               description=manifest.get("description") or None)
    if text is not None:
        (out / MODELFILE).write_text(text, encoding="utf-8")
    shutil.copytree(entry / "adapter", out / "adapter")
    shutil.copy2(entry / "manifest.json", out / "manifest.json")
    card = (entry / "README.md").read_text(encoding="utf-8") if (entry / "README.md").is_file() else ""
    (out / "README.md").write_text(card + usage(manifest["name"], fmt, quant, manifest), encoding="utf-8")
    return out
