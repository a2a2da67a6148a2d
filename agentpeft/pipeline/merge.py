"""Stage 5, merge: the adapter folded into the dequantized base at full precision, checked, then stored."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import AgentpeftError
from ..progress import bar

CHECK_PROMPTS = (
    "What is your return policy?",
    "How do I reset my device?",
    "What is the capital of France?",
)
#: Largest allowed |logit(merged) - logit(base + adapter)| in fp32.
TOLERANCE = 1e-3
#: How merged/ stores its weights (``merge.dtype``), as torch names them.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
#: Bracket the prefix ``with_default_system`` puts before a chat template, so that it is replaced, never stacked.
_SYSTEM_BEGIN = "{# agentpeft: default system prompt #}"
_SYSTEM_END = "{# agentpeft: end of default system prompt #}"


@dataclass
class MergeResult:
    """The merged checkpoint and how closely it matches the unmerged adapter."""

    path: Path
    max_logit_diff: float
    tolerance: float
    dtype: str = "fp32"
    #: Largest |logit| change from storing the fp32 merge in ``dtype`` (loaded back in fp32); 0 for fp32.
    stored_logit_diff: float = 0.0

    def summary(self) -> str:
        stored = f"; stored in {self.dtype}, max |logit diff| {self.stored_logit_diff:.2e} from rounding" \
            if self.dtype != "fp32" else "; stored in fp32"
        return (f"max |logit diff| {self.max_logit_diff:.2e} (tolerance {self.tolerance:.0e}){stored} "
                f"-> {self.path.name}/")


def with_default_system(template: str, system_prompt: str) -> str:
    """``template`` with ``system_prompt`` as the system message of a chat that brings none.

    A chat that starts with a system message renders as before; any other gets ``system_prompt``
    put first, so the template's own default (SmolLM2's names itself) gives way to it. A template
    that already has a default from this function has it replaced; an empty ``system_prompt`` removes it.
    """
    if template.startswith(_SYSTEM_BEGIN) and _SYSTEM_END in template:
        template = template.split(_SYSTEM_END, 1)[1]
    if not system_prompt:
        return template
    # A Jinja string literal: JSON's escapes (\", \\, \n, \t, \uXXXX) are Python's too.
    literal = json.dumps(system_prompt, ensure_ascii=False)
    return (f"{_SYSTEM_BEGIN}{{% if not messages or messages[0]['role'] != 'system' %}}"
            f"{{% set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
            f"{{% endif %}}{_SYSTEM_END}{template}")


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, system_prompt: str = "",
          tolerance: float = TOLERANCE, dtype: str = "bf16") -> MergeResult:
    """Merge into the fp32 base (NF4-dequantized for QLoRA, never the 4-bit weights), compare logits in fp32,
    then store the merged weights in ``dtype`` (bf16, fp16 or fp32) with a tokenizer whose chat template
    has ``system_prompt`` as its default system message."""
    import torch

    from ..models import adapter_meta, load_tokenizer, load_tuned

    if dtype not in DTYPES:
        raise AgentpeftError(f"unknown merge dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if not adapter_meta(adapter_dir)["mergeable"]:
        raise AgentpeftError(f"a {adapter_meta(adapter_dir)['method']} adapter cannot be merged; use it as base + adapter")
    steps = bar(total=3, desc="merge", unit="step")
    tokenizer = load_tokenizer(base_dir)
    model = load_tuned(base_dir, adapter_dir)
    steps.update()
    texts = [tokenizer.apply_chat_template(
        [{"role": "system", "content": system_prompt}, {"role": "user", "content": p}],
        tokenize=False, add_generation_prompt=True) for p in CHECK_PROMPTS]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    mask = batch["attention_mask"].bool()
    with torch.inference_mode():
        before = model(**batch).logits.float()
        merged = model.merge_and_unload()
        after = merged(**batch).logits.float()
    diff = (before - after).abs()[mask].max().item()
    steps.update()
    if not diff <= tolerance:
        raise AgentpeftError(
            f"merge check failed: merged logits differ from the adapter's by {diff:.2e} > {tolerance:.0e}; "
            "the merged model is not kept (report this with the recipe and base model)"
        )
    if dtype != "fp32":
        merged = merged.to(getattr(torch, DTYPES[dtype]))
        if not all(torch.isfinite(p).all() for p in merged.parameters()):
            raise AgentpeftError(f"the merged weights overflow {dtype}; build with --merge-dtype bf16 or fp32")
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.padding_side = "left"
    if isinstance(tokenizer.chat_template, str):
        tokenizer.chat_template = with_default_system(tokenizer.chat_template, system_prompt)
    tokenizer.save_pretrained(str(out_dir))
    stored = 0.0
    if dtype != "fp32":  # what storing costs, as load_model reads it back: the rounded weights in fp32
        with torch.inference_mode():
            stored = (merged.float()(**batch).logits.float() - after).abs()[mask].max().item()
    steps.update()
    steps.close()
    return MergeResult(out_dir, diff, tolerance, dtype, stored)
