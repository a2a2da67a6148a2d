import pytest

from agentpeft.default_plugins.metrics import (
    answer_accuracy, bleu, chrf, exact_match, normalize, rouge_l, token_f1)
from agentpeft.errors import AgentpeftError
from agentpeft.pipeline.evaluate import get_metrics, read_qa_jsonl, score_model


def test_accuracy_looks_for_the_normalized_key():
    refs = [{"answer": "It is 45 days.", "key": "45 days"}, {"answer": "HD-220", "key": "HD-220"},
            {"answer": "The Ember Circle.", "key": "Ember Circle"}]
    preds = ["You have 45 Days to return it!", "The code is HD 220.", "It's the loyalty club."]
    assert answer_accuracy(preds, refs) == pytest.approx(2 / 3)


def test_accuracy_needs_whole_words_and_falls_back_to_the_answer():
    assert answer_accuracy(["It costs 1450 dollars"], [{"answer": "", "key": "450"}]) == 0.0
    assert answer_accuracy(["Paris, of course."], [{"answer": "Paris"}]) == 1.0


def test_squad_style_exact_match_and_f1():
    assert normalize("The  Cat, sat!") == "cat sat"
    assert exact_match(["the cat sat."], [{"answer": "Cat sat"}]) == 1.0
    assert token_f1(["cat sat on mat"], [{"answer": "the cat sat"}]) == pytest.approx(2 * 2 / (4 + 2))
    assert token_f1(["dog"], [{"answer": "cat"}]) == 0.0


def test_rouge_bleu_chrf_are_one_for_identical_and_lower_otherwise():
    refs = [{"answer": "Refunds take nine business days to arrive."}]
    for metric in (rouge_l, bleu, chrf):
        assert metric(["Refunds take nine business days to arrive."], refs) == pytest.approx(1.0)
        assert 0 <= metric(["Refunds take a while."], refs) < 1


def test_registered_metrics_and_directions():
    metrics = get_metrics()
    assert {"accuracy", "exact_match", "token_f1", "rouge_l", "bleu", "chrf", "perplexity"} <= set(metrics)
    assert metrics["perplexity"].higher_is_better is False and metrics["accuracy"].higher_is_better


def test_unknown_metric_is_named():
    with pytest.raises(AgentpeftError, match="unknown metric"):
        score_model(None, None, [], ["nope"])


def test_qa_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"\n')
    with pytest.raises(AgentpeftError, match=r"qa.jsonl:2: not valid JSON"):
        read_qa_jsonl(path)
    path.write_text('{"question": "q"}\n')
    with pytest.raises(AgentpeftError, match=r"qa.jsonl:1: each line needs"):
        read_qa_jsonl(path)
    path.write_text('{"question": "q", "answer": "a", "key": "k"}\n\n')
    assert read_qa_jsonl(path) == [{"question": "q", "answer": "a", "key": "k"}]


class _ScriptedJudge:
    """Stands in for a LangChain chat model: grades CORRECT when the reference's key is in the reply."""

    def __init__(self):
        self.prompts = []

    def batch(self, prompts):
        from langchain_core.messages import AIMessage

        self.prompts += prompts
        out = []
        for p in prompts:
            key = p.split("Reference answer: ")[1].split("\n")[0]
            reply = p.split("Reply to grade: ")[1].split("\n")[0]
            out.append(AIMessage("CORRECT" if key in reply else ("INCORRECT." if reply else "no idea")))
        return out


def test_judge_grades_replies_against_references():
    from agentpeft.pipeline.evaluate import judge_replies

    judge = _ScriptedJudge()
    rows = [{"question": "Warranty?", "answer": "2 years"}, {"question": "Colour?", "answer": "amber"},
            {"question": "Hub?", "answer": "HB-1"}]
    graded = judge_replies(judge, rows, ["It is 2 years.", "It is blue.", ""])
    assert graded == {"score": round(1 / 3, 4), "unparsed": 1}
    assert all("Question: " in p and "CORRECT or INCORRECT" in p for p in judge.prompts)


def test_accuracy_key_alternatives():
    refs = [{"answer": "Four.", "key": "4|four"}, {"answer": "USA", "key": "United States|USA"}]
    assert answer_accuracy(["It has four legs.", "The U.S.A."], refs) == 0.5
    assert answer_accuracy(["4", "the United States"], refs) == 1.0


def test_accuracy_is_settled_once_the_key_is_followed_by_more_text():
    from agentpeft.default_plugins.metrics import accuracy_settled, answer_accuracy

    ref = {"question": "Capital of Japan?", "answer": "Tokyo", "key": "Tokyo|Edo"}
    assert not accuracy_settled("The capital is", ref)
    # A key at the very end could still grow ("Tokyoites"): not settled yet, though it scores now.
    assert not accuracy_settled("The capital is Tokyo.", ref) and answer_accuracy(["The capital is Tokyo."], [ref]) == 1
    assert accuracy_settled("The capital is Tokyo. It", ref) and accuracy_settled("Edo, once", ref)
    for grown in ("The capital is Tokyoites", "The capital is Tokyo. It is large"):
        assert answer_accuracy([grown], [ref]) == (1.0 if accuracy_settled(grown, ref) else 0.0)


def test_probe_scoring_stops_replies_once_every_metric_is_settled(tiny_base, monkeypatch):
    from agentpeft.models import load_model, load_tokenizer
    from agentpeft.pipeline import evaluate as stage

    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, settled=None):
        seen["settled"] = settled
        return ["Paris is the capital of France"] * len(prompts)

    monkeypatch.setattr(stage, "generate", fake_generate)
    rows = stage.chat_rows([{"question": "Capital of France?", "answer": "Paris", "key": "Paris"}], None)
    model, tokenizer = load_model(tiny_base), load_tokenizer(tiny_base)
    assert stage.score_model(model, tokenizer, rows, ["accuracy"])[0] == {"accuracy": 1.0}
    assert seen["settled"](0, "Paris is") and not seen["settled"](0, "Lyon is")
    # ROUGE-L reads the whole reply: with it, every reply runs to its end.
    stage.score_model(model, tokenizer, rows, ["accuracy", "rouge_l"])
    assert seen["settled"] is None
