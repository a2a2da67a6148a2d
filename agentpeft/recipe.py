"""Recipes: validated, declarative descriptions of a specialization job."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import AgentpeftError
from .plugins import _record_hook_failure, collect_by_plugin, package_of


class _Strict(BaseModel):
    # Unknown keys are typos; inf and nan pass every bound (``--lr inf`` would start a build).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataConfig(_Strict):
    """How the knowledge base becomes instruction pairs."""

    loaders: list[str] | None = Field(None, description=(
        "loaders that read the knowledge base; None: every registered loader (Markdown, text, HTML, reStructuredText, "
        "PDF, DOCX, CSV/TSV, JSONL, qna.yaml, MedQuAD XML and plugins' own)"))
    generators: list[str] = Field(["faq", "facts", "qa"], description=(
        "generators that turn Documents into question/answer pairs, in order"))
    auto_generators: bool = Field(True, description=(
        "every section no listed generator turns into a pair goes through the built-in generator that fits it: qa for "
        "question/answer documents, faq for question headings, prose synthesis for the rest; false: only the listed "
        "generators run"))
    train_phrasings: int = Field(4, ge=1, le=8, description="question phrasings per fact in train")
    seed: int = Field(0, description=(
        "seed of the data: which phrasing of each fact is held out, the order of train, the general pairs sampled, "
        "the retrieval distractors and the evaluation sample"))
    loader_options: dict[str, dict] = Field({}, description="per-loader options, e.g. {csv: {question: q}}")
    chunk_size: int = Field(1500, ge=50, description="prose chunk length in characters")
    chunk_overlap: int = Field(150, ge=0, description="characters shared by neighbouring chunks")
    strict: bool = Field(False, description="fail on knowledge-base files that cannot be read, not skip them")
    follow_external_links: bool = Field(False, description=(
        "also read files and folders of the knowledge base whose symbolic links resolve outside it; false: such "
        "links are skipped, one warning line each, so a shared knowledge base cannot pull in other files"))

    @field_validator("chunk_overlap")
    @classmethod
    def _overlap_below_size(cls, v: int, info) -> int:
        if v >= info.data.get("chunk_size", 1500):
            raise ValueError(f"chunk_overlap ({v}) must be below chunk_size ({info.data.get('chunk_size')})")
        return v
    filters: list[str] = Field([], description="extra registered filters, run after pii, dedup and length")
    paraphrases: int = Field(0, ge=0, le=8, description="extra phrasings generated per question")
    teacher: str | None = Field(None, description="teacher chat model: a registered name, 'base' or provider:model")
    redact_pii: bool = Field(False, description=(
        "replace personal data (e-mail addresses, phone numbers, IDs, ...) with typed placeholders in the knowledge "
        "base's sections right after ingestion and in the pairs, so nothing built or registered holds it"))
    general: int = Field(202, ge=0, le=202, description=(
        "general-knowledge Q/A pairs (shipped with agentpeft, disjoint from the forgetting probe) mixed into train "
        "against forgetting, held to the base model by train.anchor_kl; 0: none"))
    dedup_threshold: float = Field(0.85, gt=0, le=1, description="MinHash Jaccard above which pairs are near-duplicates")


#: Each method's learning rate where the recipe sets none (``train.lr`` null). Prompt and prefix tuning train
#: only virtual tokens (input embeddings, or each layer's key/value prefix) that steer a frozen model, and need
#: larger steps than LoRA: PEFT's prompt-tuning and prefix-tuning guides train at 3e-2 and 1e-2.
DEFAULT_LR = {"qlora": 1e-3, "lora": 1e-3, "dora": 1e-3, "prefix": 1e-2, "prompt": 3e-2}


class TrainConfig(_Strict):
    """PEFT method and trainer hyperparameters."""

    method: Literal["qlora", "lora", "dora", "prefix", "prompt"] = Field("qlora", description=(
        "PEFT method: qlora (LoRA over the base quantized to 4-bit NF4), lora, dora, prefix or prompt tuning"))
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha: the adapter's update is scaled by alpha / r")
    # peft's default; with dropout peft keeps a dropped-out copy of every adapted layer's input, which made
    # an all-linear step a third slower here (docs/performance.md).
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description=(
        "the layers LoRA adapts: module names (q_proj, v_proj, ...) or all-linear"))
    epochs: float = Field(3.0, gt=0, description="training epochs (fractions allowed)")
    max_steps: int = Field(-1, ge=-1, description="-1: run the epochs; 0: save the adapter untrained")
    lr: float | None = Field(None, gt=0, description=(
        "peak learning rate; null: the method's default, 1e-3 for qlora, lora and dora, 1e-2 for prefix and 3e-2 "
        "for prompt tuning (their few virtual-token parameters need larger steps). A recipe's lr is its method's: "
        "--method switching to a method with another default trains at that default unless --lr is given"))
    loraplus_lr_ratio: float = Field(1.0, ge=1, description=(
        "LoRA+: the B matrices learn at this multiple of lr (the A matrices at lr); 1: plain LoRA"))
    batch_size: int = Field(8, ge=1, description="examples per device step")
    grad_accum: int = Field(1, ge=1, description=(
        "gradient-accumulation steps: an optimizer step sees batch_size x grad_accum examples"))
    max_seq_len: int = Field(256, ge=16, description=(
        "longest rendered pair, in tokens: a longer answer is split into parts that fit"))
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the steps over which the learning rate warms up")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient-norm clipping threshold")
    virtual_tokens: int = Field(20, ge=1, description="prefix and prompt tuning")
    dequantize_once: bool | None = Field(None, description=(
        "qlora: train on an fp32 copy of the NF4 weights (the same values) instead of dequantizing them in every "
        "forward and backward: on a CPU without native bf16 the same fp32 matmuls, faster; with native bf16 "
        "(train.bf16) its linear layers are then copied to bf16. "
        "None: on a CPU when the fp32 copy takes under a quarter of the available memory"))
    bf16: bool | None = Field(None, description=(
        "compute the frozen base's matmuls in bf16 (autocast over a bf16 copy of its linear weights), keeping the "
        "adapter, the residual stream, the norms and the LM head's logits in fp32. None: where the hardware has native "
        "bf16 (a GPU with bf16, a CPU with AVX512-BF16 or AMX)"))
    gradient_checkpointing: bool = Field(False, description=(
        "recompute activations in the backward pass instead of keeping them: less memory, slower steps"))
    group_by_length: bool = Field(True, description="batch examples of similar length: less padding")
    rotate_phrasings: bool = Field(False, description=(
        "each epoch trains one phrasing of every fact, the next of its phrasings in turn, and every train-only "
        "pair: an epoch costs one row per fact instead of one per phrasing"))
    micro_batch_tokens: int = Field(1024, ge=0, description=(
        "on a CPU, a batch whose rows would hold more tokens than this at the longest row's length runs as "
        "micro-batches with accumulated gradients (the same batches and loss, less activation memory); 0: off"))
    share_prefix: bool = Field(True, description=(
        "compute the prompt prefix that rows of a batch share (system prompt, chat template) once per batch"))
    anchor_kl: float = Field(3.0, ge=0, description=(
        "train-only general pairs hold the model to its base: their loss is this weight times the KL divergence "
        "from the base model's next-token distributions (adapter off) instead of cross-entropy; 0: cross-entropy"))
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps; 0 = four times per run")
    report_to: list[Literal["none", "tensorboard", "wandb"]] = Field(["none"], description=(
        "where the trainer also logs: none, tensorboard, wandb"))
    seed: int = Field(42, description="training seed: adapter initialization and batch order")

    @property
    def learning_rate(self) -> float:
        """The peak learning rate training runs at: ``lr``, else the method's default (``DEFAULT_LR``)."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


class EvalConfig(_Strict):
    """Metrics and generation settings of the evaluation."""

    metrics: list[str] = Field(["accuracy", "rouge_l"], description=(
        "registered metrics computed on the held-out questions (accuracy, token_f1, rouge_l, bleu, perplexity, ...)"))
    primary: str = Field("accuracy", description=(
        "the metric the registration gate compares between base and tuned model; one of metrics"))
    max_new_tokens: int = Field(64, ge=1, description="longest reply generated per question, in tokens")
    batch_size: int = Field(64, ge=1, description="prompts generated together")
    forgetting_probe: bool = Field(True, description=(
        "also ask both models general-knowledge questions, to measure what the tuned model forgot"))
    max_questions: int | None = Field(None, ge=1, description="evaluate a seeded sample of at most N held-out questions")

    @field_validator("primary")
    @classmethod
    def _primary_is_a_metric(cls, v: str, info) -> str:
        if v not in info.data.get("metrics", []):
            raise ValueError(f"primary metric {v!r} must be one of metrics {info.data.get('metrics')}")
        return v


class RetrievalConfig(_Strict):
    """Retrieval-augmented mode: the question's best knowledge-base sentences in the prompt, trained RAFT-style."""

    enabled: bool | Literal["auto"] = Field("auto", description=(
        "true: questions are asked with their top kb_search passages, in training, evaluation and use; auto: on when "
        "at least prose_share of the knowledge base's facts come from prose synthesis"))
    k: int = Field(3, ge=1, le=20, description=(
        "sentences put into each prompt, the best first, each under its section's heading"))
    distractors: int = Field(0, ge=0, le=20, description=(
        "of a training prompt's k sentences, how many of the lowest-ranked retrieved ones are replaced by unrelated "
        "ones (RAFT); the retrieved ones that do not answer the question already teach the model to ignore a sentence"))
    prose_share: float = Field(0.5, ge=0, le=1, description="the share of prose-synthesized facts that turns auto on")
    max_seq_len: int = Field(384, ge=64, description=(
        "longest training row with its passages, in tokens (train.max_seq_len where that is longer)"))


class MergeConfig(_Strict):
    """How the merged checkpoint (merged/) is stored."""

    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description=(
        "the merged weights' dtype in merged/: bf16 (half the size of fp32, the range of fp32), fp16, or fp32; "
        "the merge and its check are computed in fp32 either way"))


class Recipe(_Strict):
    """A recipe: knowledge base, data mix, PEFT setup and metrics, as data."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description=(
        "the recipe's name (lower-case letters, digits, '.', '_', '-'); the registered model's default name"))
    description: str = Field("", description="what the model is for: shown by `agentpeft recipes` and in the manifest")
    system_prompt: str = Field(description=(
        "the system prompt the model is trained, evaluated and used with"))
    kb_system_prompt: str | None = Field(None, description=(
        "the system prompt when --kb replaces the recipe's own knowledge base (it names no company of the recipe's); "
        "None: system_prompt"))
    base_model: str = Field("smollm2-135m", description=(
        "the base model: an alias (`agentpeft models list`), a local folder or a Hugging Face hub id"))
    knowledge_base: Path | None = Field(None, description=(
        "the knowledge base, a file or a folder; a relative path resolves against the recipe file's folder"))
    data: DataConfig = Field(DataConfig(), description="how the knowledge base becomes instruction pairs")
    train: TrainConfig = Field(TrainConfig(), description="PEFT method and trainer hyperparameters")
    eval: EvalConfig = Field(EvalConfig(), description="metrics and generation settings of the evaluation")
    tools: list[str] = Field([], description="tools the registered model gets (kb_search, create_ticket, ...)")
    retrieval: RetrievalConfig = Field(RetrievalConfig(), description=(
        "retrieval-augmented mode: the question's best knowledge-base sentences in the prompt, trained RAFT-style"))
    merge: MergeConfig = Field(MergeConfig(), description="how the merged checkpoint is stored")
    #: Folder of the recipe file; a relative knowledge_base resolves against it.
    root: Path | None = Field(None, exclude=True)

    @property
    def kb_path(self) -> Path | None:
        if self.knowledge_base is None:
            return None
        if self.knowledge_base.is_absolute() or self.root is None:
            return self.knowledge_base
        return self.root / self.knowledge_base

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        """Load and validate a recipe file (YAML)."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise AgentpeftError(f"cannot read recipe file {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise AgentpeftError(f"cannot read recipe file {path}: not UTF-8 text (byte {exc.start}); "
                                 "give a YAML recipe file") from None
        except yaml.YAMLError as exc:  # its own message spans several lines: keep the gist and where
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise AgentpeftError(f"cannot read recipe file {path}: invalid YAML"
                                 f"{f' ({exc.problem})' if getattr(exc, 'problem', None) else ''}{where}; "
                                 "fix the file and retry") from None
        if not isinstance(raw, dict):
            raise AgentpeftError(f"recipe file {path} must hold a mapping of fields, not {type(raw).__name__}")
        try:
            return cls(**raw, root=path.parent)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise AgentpeftError(
                f"recipe file {path}: field '{field}': {first['msg']} (fix the field and retry)"
            ) from None


def get_recipes() -> dict[str, Recipe]:
    """All registered recipes by name (built-in and from plugins)."""
    return {name: recipe for name, (recipe, _) in recipe_sources().items()}


def recipe_sources() -> dict[str, tuple[Recipe, str]]:
    """Every registered recipe by name, with the package that registered it ("agentpeft (built-in)" or
    the plugin's distribution); when two register the same name, the first one called wins."""
    recipes: dict[str, tuple[Recipe, str]] = {}
    for plugin_name, item in collect_by_plugin("register_recipes"):
        try:
            recipe = item if isinstance(item, Recipe) else Recipe.from_file(item)
        except AgentpeftError as exc:  # one broken recipe file: reported by `agentpeft plugins`, the others still work
            _record_hook_failure(plugin_name, f"register_recipes ({Path(str(item)).name})", exc)
            continue
        recipes.setdefault(recipe.name, (recipe, package_of(plugin_name)))
    return recipes


def get_recipe(name: str) -> Recipe:
    """Look a recipe up by name, or load it from a recipe file, or a folder holding recipe.yaml."""
    path = Path(name) / "recipe.yaml" if Path(name).is_dir() else Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return Recipe.from_file(path)
    recipes = get_recipes()
    if name not in recipes:
        known = ", ".join(sorted(recipes)) or "none"
        raise AgentpeftError(
            f"unknown recipe {name!r} (known: {known}); run `agentpeft recipes` to list them, "
            "or give a recipe.yaml file or a folder that holds one"
        )
    return recipes[name]


def configure(recipe: str | Recipe, kb: str | Path | None = None, base: str | None = None,
              strict: bool | None = None, data_mix: dict | None = None, system_prompt: str | None = None,
              retrieval: bool | str | None = None, merge_dtype: str | None = None, **train_overrides) -> Recipe:
    """The recipe with command-line overrides applied (``train_overrides`` are TrainConfig fields,
    ``data_mix`` DataConfig fields such as ``general`` and ``train_phrasings``; ``strict`` fails on
    unreadable knowledge-base files instead of skipping them; ``retrieval`` is True, False or "auto";
    ``merge_dtype`` is how merged/ stores its weights: bf16, fp16 or fp32).
    ``None`` values leave the recipe's own.

    A ``kb`` other than the recipe's own knowledge base takes ``kb_system_prompt`` as the system prompt,
    so that a model built on another company's documents does not introduce itself as the recipe's;
    ``system_prompt`` sets it outright."""
    recipe = recipe if isinstance(recipe, Recipe) else get_recipe(recipe)
    train = _overridden(recipe.train, train_overrides)
    if train_overrides.get("lr") is None and DEFAULT_LR[train.method] != DEFAULT_LR[recipe.train.method]:
        train = train.model_copy(update={"lr": None})  # the recipe's lr was chosen for its own method
    if train.loraplus_lr_ratio > 1 and train.method in ("prefix", "prompt"):
        raise AgentpeftError(f"--loraplus-lr-ratio applies to qlora, lora and dora, not {train.method}; drop it")
    update: dict = {"train": train, "data": _overridden(recipe.data, {**(data_mix or {}), "strict": strict or None})}
    if kb is not None and not str(kb).strip():
        raise AgentpeftError("--kb is empty; pass a knowledge-base folder or file")
    if kb is not None:
        update["knowledge_base"] = Path(kb).resolve()
        own = recipe.kb_path.resolve() if recipe.kb_path is not None else None
        if own != update["knowledge_base"] and recipe.kb_system_prompt:
            update["system_prompt"] = recipe.kb_system_prompt
    if system_prompt is not None:
        if not system_prompt.strip():
            raise AgentpeftError("--system-prompt is empty; pass the text the model is told before each chat")
        update["system_prompt"] = system_prompt.strip()
    if retrieval is not None:
        update["retrieval"] = _overridden(recipe.retrieval, {"enabled": retrieval})
    if base is not None:
        update["base_model"] = base
    if merge_dtype is not None:
        update["merge"] = _overridden(recipe.merge, {"dtype": merge_dtype}, option="--merge-dtype")
    return recipe.model_copy(update=update)


def _overridden(config: BaseModel, overrides: dict, option: str | None = None) -> BaseModel:
    """``config`` with the non-None ``overrides`` applied and validated; an invalid one names its option
    (``option``, or the field's name as an option)."""
    over = {k: v for k, v in overrides.items() if v is not None}
    if not over:
        return config
    try:
        return type(config)(**{**config.model_dump(), **over})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise AgentpeftError(f"{option or '--' + str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
