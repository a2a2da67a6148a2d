"""Benchmark: the training-throughput comparison of bench/train_throughput.py on a CUDA GPU.

The model is randomly initialized with Llama-3.2-1B's shape (16 layers, hidden 2048, intermediate 8192,
32 heads, 8 key-value heads, vocab 128256, tied embeddings): nothing is downloaded, and throughput does not
depend on trained weights. agentpeft's train stage and the plain Hugging Face QLoRA script run alternately
on the support-bot dataset; recorded: tokens/s, answer tokens/s, peak GPU memory
(``torch.cuda.max_memory_allocated``), the ratio to the baseline and the GPU's name.

The tokenizer is the smollm2-135m alias's when it is in AGENTPEFT_HOME (or ``--tokenizer FOLDER``), else a
byte-level one built here (no download; sequences are then about four times longer).

    python bench/gpu_train.py                 # on a CUDA machine: a few minutes
    python bench/gpu_train.py --small         # on CPU with a tiny config (what the test suite runs)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402

LLAMA_32_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
               "rope_theta": 500000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 1024,
         "tie_word_embeddings": True}
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_tokenizer():
    """A byte-level tokenizer with ChatML specials: 256 byte tokens, no merges, nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", *sorted(alphabet)])}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def make_model(folder: Path, shape: dict, tokenizer_dir: str | None) -> Path:
    """Save a random-init Llama of ``shape`` with a tokenizer into ``folder``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from agentpeft.models import models_dir

    default = models_dir() / "smollm2-135m"
    source = tokenizer_dir or (str(default) if (default / "tokenizer.json").is_file() else None)
    tokenizer = AutoTokenizer.from_pretrained(source) if source else byte_tokenizer()
    shape = {**shape, "vocab_size": max(shape["vocab_size"], len(tokenizer))}
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny config on CPU (the test suite's smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="default 30 on GPU, 2 with --small")
    parser.add_argument("--rounds", type=int, default=None, help="A/B pairs; default 2 on GPU, 1 with --small")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: smollm2-135m's if pulled, else byte-level)")
    parser.add_argument("--out", default=None)
    tt.child_options(parser)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--agentpeft", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return tt.child_main(args)
    import torch

    if not args.small and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; run with --small for the CPU smoke run")
    steps = args.steps or (2 if args.small else 30)
    rounds = args.rounds or (1 if args.small else 2)
    out = Path(args.out or tt.RESULTS / ("gpu_train_small.json" if args.small else "gpu_train.json"))
    with tempfile.TemporaryDirectory() as tmp:
        base = make_model(Path(tmp) / "model", SMALL if args.small else LLAMA_32_1B, args.tokenizer)
        # The smoke run's byte-level tokenizer spends a token per character: its pairs need SMALL's whole context.
        length = {"max_seq_len": SMALL["max_position_embeddings"]} if args.small else {}
        data = tt.build_data(base, Path(tmp) / "data", **length)
        # Whole batches as the baseline runs them (a CPU would split these long rows into micro-batches).
        result = tt.benchmark(base, data, steps, rounds, {**length, "micro_batch_tokens": 0}, evaluate=False,
                              matmul_size=512 if args.small else 8192)
    result.update(model="random-init " + ("tiny Llama (--small)" if args.small else "Llama-3.2-1B shape"),
                  device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})",
                  torch=torch.__version__)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
