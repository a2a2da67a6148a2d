"""Stage 5, merge: the adapter folded into the dequantized base at full precision, then checked."""

from __future__ import annotations

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


@dataclass
class MergeResult:
    """The merged checkpoint and how closely it matches the unmerged adapter."""

    path: Path
    max_logit_diff: float
    tolerance: float

    def summary(self) -> str:
        return f"max |logit diff| {self.max_logit_diff:.2e} (tolerance {self.tolerance:.0e}) -> {self.path.name}/"


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, system_prompt: str = "",
          tolerance: float = TOLERANCE) -> MergeResult:
    """Merge into the fp32 base (NF4-dequantized for QLoRA, never the 4-bit weights) and compare logits."""
    import torch

    from ..models import adapter_meta, load_tokenizer, load_tuned

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
    with torch.inference_mode():
        before = model(**batch).logits.float()
        merged = model.merge_and_unload()
        after = merged(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    diff = (before - after).abs()[mask].max().item()
    steps.update()
    if not diff <= tolerance:
        raise AgentpeftError(
            f"merge check failed: merged logits differ from the adapter's by {diff:.2e} > {tolerance:.0e}; "
            "the merged model is not kept (report this with the recipe and base model)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(str(out_dir))
    steps.update()
    steps.close()
    return MergeResult(out_dir, diff, tolerance)
