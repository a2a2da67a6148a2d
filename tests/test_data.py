import json

import pytest

from agentpeft.errors import AgentpeftError
from agentpeft.models import load_tokenizer
from agentpeft.pipeline.dataset import build_dataset
from agentpeft.pipeline.ingest import ingest
from agentpeft.recipe import get_recipe

FAQ = """# Acme FAQ

## How long is the warranty?

Every Acme toaster has a **7-year** warranty.

## Products

- **Price:** $42
- **Model code:** AC-1
"""


def test_markdown_sections_keep_source_and_line(tmp_path):
    (tmp_path / "faq.md").write_text(FAQ)
    docs = ingest(tmp_path)
    heads = [d.metadata["heading"] for d in docs]
    assert heads == ["How long is the warranty?", "Products"]
    assert docs[0].metadata["line"] == 3 and docs[0].metadata["source"].endswith("faq.md")


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "holds no file"),
    (lambda p: (p / "a.md").write_text("\n\n") and p, "is empty"),
])
def test_bad_knowledge_base(tmp_path, make, message):
    with pytest.raises(AgentpeftError, match=message):
        ingest(make(tmp_path))


def test_non_utf8_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.md").write_bytes(b"# T\n\n\xff\xfe caf\xe9")
    with pytest.raises(AgentpeftError, match="not UTF-8"):
        ingest(tmp_path)


def test_dataset_split_and_rendering(tmp_path, tiny_base):
    recipe = get_recipe("support-bot")
    docs = ingest(recipe.kb_path)
    result = build_dataset(docs, ["faq", "facts"], load_tokenizer(tiny_base), "SYS", tmp_path, train_phrasings=2)
    from datasets import load_from_disk

    ds = load_from_disk(str(result.path))
    assert result.card["facts"] >= 40
    assert len(ds["eval"]) == result.card["facts"]
    train_questions = {q.lower() for q in ds["train"]["question"]}
    assert not train_questions & {q.lower() for q in ds["eval"]["question"]}
    assert set(ds["eval"]["fact_id"]) <= set(ds["train"]["fact_id"])
    for row in ds["eval"]:
        assert row["key"].lower() in row["answer"].lower()
        assert row["text"].startswith("<|im_start|>system\nSYS<|im_end|>")
    assert "**" not in "".join(ds["train"]["answer"])
    assert (tmp_path / "dataset_card.md").is_file()
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == len(ds["train"])
    assert json.loads((tmp_path / "dataset_card.json").read_text())["splits"]["eval"] == len(ds["eval"])


def test_kb_without_pairs_fails_clearly(tmp_path, tiny_base):
    (tmp_path / "notes.md").write_text("# Notes\n\nJust prose, no questions.\n")
    with pytest.raises(AgentpeftError, match="yields no question/answer pair"):
        build_dataset(ingest(tmp_path), ["faq", "facts"], load_tokenizer(tiny_base), "S", tmp_path / "o")


def test_general_pairs_are_plain_chats_disjoint_from_the_probe():
    """The general pairs are train-only, asked without the system prompt, and share neither a
    question nor a key fact with the forgetting probe that measures what they protect."""
    import json
    import re
    from importlib import resources

    from agentpeft.default_plugins.generators import general_pairs
    from agentpeft.pipeline.evaluate import forgetting_probe
    from agentpeft.recipe import get_recipe

    recipe = get_recipe("support-bot")
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"general": 7})})
    pairs = general_pairs([], recipe)
    assert len(pairs) == 7 and not any(p.held_out or p.system for p in pairs)
    assert general_pairs([], recipe) == pairs  # seeded
    pool = [json.loads(line) for line in resources.files("agentpeft").joinpath("data", "general_qa.jsonl")
            .read_text().splitlines() if line.strip()]
    assert len(pool) >= 200 and {(p.question, p.answer) for p in pairs} <= {(r["question"], r["answer"]) for r in pool}
    from agentpeft.recipe import DataConfig

    limit = [m.le for m in DataConfig.model_fields["general"].metadata if getattr(m, "le", None) is not None]
    assert limit == [len(pool)]  # data.general can ask for every pair the pool holds, and no more
    probe = forgetting_probe()
    keys = {k.strip().lower() for row in probe for k in row["key"].split("|")}
    questions = {row["question"].lower() for row in probe}
    for row in pool:
        text = f"{row['question']} {row['answer']}".lower()
        assert row["question"].lower() not in questions
        assert not [k for k in keys if len(k) > 2 and re.search(rf"\b{re.escape(k)}\b", text)], row
