"""Memory planner: what a training run needs, from the model config alone (a meta-device model, no weights).

The parameter counts come from applying the real peft config to a model built on the meta device, so
they are exactly what ``print_trainable_parameters`` prints for the same setup. The memory estimate adds:

- **weights**: ``qlora`` quantizes every ``nn.Linear`` of the decoder (not ``lm_head``) to 4-bit NF4 with
  double quantization: 0.5 byte per weight, one 8-bit absmax per 64-weight block, one fp32 absmax per 256
  blocks and a 256-entry code table per tensor; the other parameters (embeddings, norms) are fp32 because
  peft's ``prepare_model_for_kbit_training`` casts them. ``lora`` and ``full`` keep every weight in ``dtype``.
  On CPU a 4-bit model is quantized from the memory-mapped checkpoint, whose pages stay resident, so the
  checkpoint file is counted too (``checkpoint_mapping``); so it is for ``lora`` and ``full`` when ``dtype``
  is bfloat16 over an fp32 checkpoint (weights converted to bf16 under ``train.bf16``).
- **adapter**, **gradients**, **optimizer**: trainable parameters in fp32 (peft keeps adapters in fp32);
  gradients one copy; AdamW two fp32 states. Full fine-tuning keeps all three in ``dtype``. Without
  gradient accumulation the gradients and the activations do not peak together: backward frees each
  layer's saved activations as it writes that layer's gradients, and the optimizer steps after all of
  them are freed, so the peak is ``max(activations + head gradients, all gradients)`` (the head's, and
  with tied embeddings the embeddings', gradients come first); ``gradients`` counts what that adds to
  the activations. With ``grad_accum > 1`` every gradient is kept through the next micro-batch.
- **activations** for ``T = batch_size * seq_len`` tokens in the compute dtype (fp32 on a CPU without native
  bf16), per decoder layer and token (hidden ``h``, intermediate ``i``, query width ``q = heads * head_dim``,
  key/value width ``kv``):
  ``4h`` (two RMSNorms: input and normalized) + ``2q + 2kv + heads`` (SDPA saves q, k, v, its output and
  the log-sum-exp; a memory-efficient kernel, so nothing quadratic in the length) + ``3i`` (gate, up and
  SiLU outputs), plus the inputs of every linear layer whose weight is trained (full fine-tuning), plus
  per LoRA module its dropout output and mask and its rank-``r`` intermediate. The head adds ``3 * vocab``
  per token (fp32 logits, log-softmax, and its gradient). With gradient checkpointing only each layer's
  input (``h``) is kept, plus one layer recomputed during backward.
- **overhead**: the framework (Python, torch, transformers, peft, TRL: 0.55 GiB resident on CPU, measured)
  and, on CUDA, the context and allocator (about 0.5 GiB); plus one transient fp32 dequantized copy of the
  largest weight matrix for ``qlora``.

``bench/train_methods.py`` compares these estimates with the peak RSS of real runs on SmolLM2-135M.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import AgentpeftError

GIB = 2**30
METHODS = ("qlora", "lora", "full")
#: Resident memory of Python with torch, transformers, peft and TRL imported and a trainer built (CPU).
CPU_FRAMEWORK_BYTES = int(0.55 * GIB)
#: CUDA context, cuBLAS workspace and caching-allocator slack.
CUDA_FRAMEWORK_BYTES = int(0.5 * GIB)
_NF4_BLOCK, _NF4_BLOCK2 = 64, 256


@dataclass
class Plan:
    """Parameter counts and the estimated peak memory of one training setup (bytes per component)."""

    base: str
    method: str
    trainable_params: int
    all_params: int
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    device: str
    dtype: str = "float32"
    components: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    def peft_line(self) -> str:
        """The line peft's ``print_trainable_parameters`` prints."""
        return (f"trainable params: {self.trainable_params:,} || all params: {self.all_params:,} || "
                f"trainable%: {100 * self.trainable_params / self.all_params:.4f}")

    def table(self) -> str:
        rows = [f"  {name:<20}{size / GIB:9.3f} GiB" for name, size in self.components.items()]
        return "\n".join([
            self.peft_line(),
            f"estimated peak memory ({self.method}, batch {self.batch_size} x {self.seq_len} tokens, "
            f"{'gradient checkpointing, ' if self.gradient_checkpointing else ''}{self.device}, {self.dtype}):",
            *rows, f"  {'total':<20}{self.total_bytes / GIB:9.3f} GiB"])

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes, "total_gib": round(self.total_bytes / GIB, 3),
                "peft_line": self.peft_line()}


def load_config(spec: str):
    """A model config from a folder (or config.json file), a registered alias, or a hub id in the local cache."""
    from transformers import AutoConfig

    from .models import ALIASES, models_dir

    if spec in ALIASES:
        folder = models_dir() / spec
        if not (folder / "config.json").is_file():
            raise AgentpeftError(f"model alias {spec!r} is not pulled yet; run `agentpeft models pull {spec}` "
                                 "or pass --base with a folder holding its config.json")
        return AutoConfig.from_pretrained(str(folder))
    path = Path(spec).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AgentpeftError(f"{path} has no config.json; point --base at a model folder or its config.json")
        return AutoConfig.from_pretrained(str(path))
    try:
        return AutoConfig.from_pretrained(spec, local_files_only=True)
    except Exception:
        raise AgentpeftError(
            f"no config found for {spec!r}: not an alias, a folder with config.json, or a hub id whose config is "
            f"in the local Hugging Face cache (fetch just the config: hf download {spec} config.json)") from None


def meta_model(config, method: str, r: int = 16, alpha: int = 32, target_modules="all-linear",
               dropout: float = 0.0):
    """The model built on the meta device, wrapped with peft's LoRA for ``qlora``/``lora``."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    try:
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                target_modules=target_modules, task_type="CAUSAL_LM"))
    except ValueError as exc:
        raise AgentpeftError(f"--target-modules: {str(exc).splitlines()[0]}") from None


def plan(base: str, method: str = "qlora", r: int = 16, target_modules: list[str] | str = "all-linear",
         batch_size: int = 8, seq_len: int = 256, gradient_checkpointing: bool = False, device: str = "cpu",
         dtype: str = "auto", alpha: int = 32, dropout: float = 0.0, dequantize_once: bool = False,
         grad_accum: int = 1) -> Plan:
    """Count parameters exactly and estimate the peak memory of training ``base`` with ``method``.

    ``dtype`` "auto" plans what training computes in: bfloat16 on a GPU (Ampere or newer assumed) and on a
    CPU with native bf16 (this machine's), float32 on other CPUs.
    """
    if method not in METHODS:
        raise AgentpeftError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if device not in ("cpu", "cuda"):
        raise AgentpeftError(f"--device must be cpu or cuda, not {device!r}")
    if dtype not in ("auto", "float32", "bfloat16"):
        raise AgentpeftError(f"--dtype must be auto, float32 or bfloat16, not {dtype!r}")
    if dtype == "auto":
        from .models import cpu_bf16_supported

        dtype = "bfloat16" if device == "cuda" or cpu_bf16_supported() else "float32"
    if min(r, batch_size, seq_len, grad_accum) < 1:
        raise AgentpeftError("--r, --batch-size, --seq-len and --grad-accum must be positive")
    import torch

    config = load_config(base)
    model = meta_model(config, method, r, alpha, target_modules, dropout)
    if method == "full":
        total = trainable = sum(p.numel() for p in model.parameters())
    else:
        trainable, total = model.get_nb_trainable_parameters()
    result = Plan(base, method, trainable, total, batch_size, seq_len, gradient_checkpointing, device, dtype)
    wbytes = 2 if dtype == "bfloat16" else 4
    abytes = wbytes  # activations in the compute dtype, as the weights

    base_model = model.get_base_model() if method != "full" else model
    lm_head = base_model.get_output_embeddings()
    linear = [m for m in base_model.modules() if isinstance(m, torch.nn.Linear) and m is not lm_head]
    lora_a = [m for name, m in base_model.named_modules() if name.endswith("lora_A.default")]
    quantizable = {id(m.weight) for m in linear if not any(m.weight is a.weight for a in lora_a)}
    frozen = [p for p in base_model.parameters() if not p.requires_grad] if method != "full" else []
    c = result.components
    if method == "qlora":
        quant = [p for p in frozen if id(p) in quantizable]
        rest = [p for p in frozen if id(p) not in quantizable]
        n4 = sum(p.numel() for p in quant)
        if dequantize_once:  # train.dequantize_once: the NF4 values kept (in bf16 under train.bf16), none per call
            c["weights_dequantized"] = wbytes * n4
        else:
            c["weights_4bit"] = n4 // 2 + n4 // _NF4_BLOCK + 4 * (n4 // (_NF4_BLOCK * _NF4_BLOCK2) + 1) \
                + 2048 * len(quant)
        c["weights_other"] = 4 * sum(p.numel() for p in rest)
        if device == "cpu":
            c["checkpoint_mapping"] = _checkpoint_bytes(config) * sum(p.numel() for p in frozen)
        if not dequantize_once:
            c["dequant_buffer"] = 4 * max((p.numel() for p in quant), default=0)
    else:
        weights = sum(p.numel() for p in (frozen if method != "full" else model.parameters()))
        c["weights"] = wbytes * weights
        if device == "cpu" and wbytes == 2 and _checkpoint_bytes(config) == 4:  # bf16 copies beside the mapped file
            c["checkpoint_mapping"] = 4 * weights
    state = wbytes if method == "full" else 4
    if method != "full":
        c["adapter"] = 4 * trainable
    activations = abytes * _activation_elements(config, base_model, method, r, dropout, lora_a,
                                                batch_size * seq_len, gradient_checkpointing)
    c["gradients"] = state * trainable
    if grad_accum == 1:
        head = state * sum(p.numel() for p in lm_head.parameters() if p.requires_grad)
        c["gradients"] = max(head, c["gradients"] - activations)
    c["optimizer"] = 2 * state * trainable
    c["activations"] = activations
    c["overhead"] = CUDA_FRAMEWORK_BYTES if device == "cuda" else CPU_FRAMEWORK_BYTES
    return result


def _activation_elements(config, model, method: str, r: int, dropout: float, lora_a: list, tokens: int,
                         checkpointing: bool) -> int:
    """Saved-for-backward elements for ``tokens`` tokens (see the module docstring for the formula)."""
    h = config.hidden_size
    i = config.intermediate_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    q = heads * head_dim
    per_layer = 4 * h + 2 * q + 2 * kv + heads + 3 * i
    if method == "full":
        per_layer += h + q + h + i  # inputs of q/k/v (shared), o, gate/up (shared) and down projections
    else:
        # Each LoRA module keeps its dropout output (plus a one-byte mask, a quarter element) and its r-wide middle.
        per_module = [(a.in_features * (1.25 if dropout > 0 else 0)) + r for a in lora_a]
        per_layer += int(sum(per_module) / max(layers, 1))
    head = 2 * h + 3 * config.vocab_size
    if checkpointing:
        return tokens * (layers * h + per_layer + head)
    return tokens * (layers * per_layer + head)


def _checkpoint_bytes(config) -> int:
    """Bytes per weight in the checkpoint file (its config's dtype; fp32 when unstated)."""
    return 2 if "16" in str(getattr(config, "dtype", None)) else 4  # transformers 5 reads torch_dtype into dtype
