"""Registered models as LangChain chat models, their tools and agents, and `agentpeft chat`."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any, Callable

import pytest
from click.testing import CliRunner
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from agentpeft.cli import cli
from agentpeft.errors import AgentpeftError


@pytest.fixture
def reg(registered, monkeypatch):
    monkeypatch.setenv("AGENTPEFT_HOME", str(registered["home"]))
    return registered


# --- the chat model -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["support-bot", "prompt-bot"])
def test_invoke_stream_batch_and_ainvoke_agree(reg, name):
    from agentpeft.langchain import load_llm

    llm = load_llm(name, max_new_tokens=6)
    question = "How long is the standard warranty?"
    reply = llm.invoke(question)
    assert isinstance(reply, AIMessage) and isinstance(reply.content, str)
    assert reply.usage_metadata["output_tokens"] >= 1 and reply.usage_metadata["input_tokens"] > 10
    chunks = list(llm.stream(question))
    assert len([c for c in chunks if c.content]) >= 2  # token by token, not one block
    assert "".join(c.content for c in chunks) == reply.content
    assert [m.content for m in llm.batch([question, "Where is Brindlewick headquartered?"])] == [
        reply.content, llm.invoke("Where is Brindlewick headquartered?").content]
    assert asyncio.run(llm.ainvoke(question)).content == reply.content

    async def astream() -> str:
        return "".join([c.content async for c in llm.astream(question)])

    assert asyncio.run(astream()) == reply.content


def test_prompt_tuned_entry_loads_as_base_plus_adapter(reg):
    from peft import PeftModel

    from agentpeft.langchain import load_llm
    from agentpeft.registry import resolve

    assert not (resolve("prompt-bot") / "merged").exists()
    assert isinstance(load_llm("prompt-bot").llm.pipeline.model, PeftModel)


def test_system_prompt_cache_and_generation_settings(reg):
    from agentpeft.langchain import load_llm
    from agentpeft.registry import show

    llm = load_llm("support-bot", max_new_tokens=4)
    system = show("support-bot")["system_prompt"]
    assert system in llm._to_chat_prompt([HumanMessage("hi")])
    own = llm._to_chat_prompt([SystemMessage("Be terse."), HumanMessage("hi")])
    assert "Be terse." in own and system not in own
    assert load_llm("support-bot@1").llm.pipeline.model is llm.llm.pipeline.model  # loaded once per process
    reply = llm.invoke("hi")
    assert reply.usage_metadata["output_tokens"] <= 4
    longer = llm.invoke("hi", max_new_tokens=9)  # per call, overriding the load-time setting
    assert longer.usage_metadata["output_tokens"] > reply.usage_metadata["output_tokens"]
    assert longer.response_metadata["finish_reason"] in ("length", "stop")
    # A stop string ends generation early and is cut from the reply.
    first = llm.invoke("hi", max_new_tokens=9).content
    assert first  # the tiny model always says something in 9 tokens
    stopped = llm.invoke("hi", max_new_tokens=9, stop=[first[0]])
    assert stopped.content == "" and stopped.usage_metadata["output_tokens"] < 9


def test_tool_messages_render_into_the_prompt(reg):
    from agentpeft.langchain import load_llm

    llm = load_llm("support-bot")
    call = {"name": "kb_search", "args": {"query": "refund"}, "id": "c1", "type": "tool_call"}
    messages = [HumanMessage("refund?"), AIMessage("", tool_calls=[call]),
                ToolMessage("Refunds take 9 business days.", tool_call_id="c1")]
    tools = [{"type": "function", "function": {"name": "kb_search", "description": "search", "parameters": {}}}]
    prompt = llm._to_chat_prompt(messages, tools)
    assert '<tool_call>{"name": "kb_search", "arguments": {"query": "refund"}}</tool_call>' in prompt
    assert "<tool_response>\nRefunds take 9 business days.\n</tool_response>" in prompt
    assert '"name": "kb_search"' in prompt.split("<|im_end|>")[0]  # tools described in the system turn
    assert isinstance(llm.invoke(messages), AIMessage)  # a tool message last is accepted


def test_tool_call_parsing_and_stream_holdback():
    from agentpeft.chat_models import _safe_prefix, parse_tool_calls

    text, calls, invalid = parse_tool_calls(
        'Let me check.<tool_call>{"name": "kb_search", "arguments": {"query": "refund"}}</tool_call>'
        "<tool_call>{broken</tool_call>")
    assert text == "Let me check."
    assert [(c["name"], c["args"]) for c in calls] == [("kb_search", {"query": "refund"})]
    assert len(invalid) == 1 and invalid[0]["args"] == "{broken"
    assert parse_tool_calls("plain answer") == ("plain answer", [], [])
    assert _safe_prefix("Answer <tool_c", ["<tool_call>"]) == "Answer "
    assert _safe_prefix("Answer. END more", ["END"]) == "Answer. "
    assert _safe_prefix("Answer <b>", ["<tool_call>"]) == "Answer <b>"


# --- tools ----------------------------------------------------------------------------------------
def test_registered_model_carries_its_kb_and_tools(reg):
    from agentpeft.langchain import get_tools
    from agentpeft.registry import resolve, show

    assert (resolve("support-bot") / "kb.jsonl").is_file()
    assert show("support-bot")["tools"] == ["kb_search", "create_ticket"]
    tools = get_tools("support-bot")
    assert [t.name for t in tools] == ["kb_search", "create_ticket", "ask_support-bot"]
    schemas = {t.name: set(t.args_schema.model_json_schema()["properties"]) for t in tools}
    assert schemas == {"kb_search": {"query", "k"}, "create_ticket": {"email", "subject", "body"},
                       "ask_support-bot": {"question"}}


def test_kb_search_returns_the_right_passage(reg):
    from agentpeft.langchain import get_tools

    kb_search = {t.name: t for t in get_tools("support-bot")}["kb_search"]
    found = kb_search.invoke({"query": "how long does a refund take", "k": 2})
    first = found.split("\n\n")[0]
    assert first.startswith("[1] (") and "9 business days" in first  # policies.md or a ticket that says it
    assert "18 months" in kb_search.invoke({"query": "refurbished lamp warranty", "k": 1})
    assert "No passage" in kb_search.invoke({"query": "zzzqqq"})
    assert "invalid arguments: k" in kb_search.invoke({"query": "refund", "k": 0})


def test_kb_search_survives_a_moved_knowledge_base(reg, tmp_path):
    """The chunks come from the registry entry, not from the recipe folder the model was built from."""
    from agentpeft.default_plugins.tools import kb_search_tool
    from agentpeft.recipe import get_recipe

    moved = get_recipe("support-bot").model_copy(update={"knowledge_base": tmp_path / "gone"})
    assert "9 business days" in kb_search_tool(moved, "support-bot@1").invoke({"query": "refund take"})


def test_create_ticket_stores_text_verbatim_through_parameters(reg):
    from agentpeft.langchain import get_tools
    from agentpeft.tickets import get_ticket, list_tickets, tickets_path

    create = {t.name: t for t in get_tools("support-bot")}["create_ticket"]
    body = "My lamp flickers'); DROP TABLE tickets; -- and \"quotes\" stay; 1 OR 1=1"
    reply = create.invoke({"email": "ana@example.com", "subject": "Flicker'; DELETE FROM tickets", "body": body})
    ticket_id = int(reply.split("#")[1].split()[0])
    row = get_ticket(ticket_id)
    assert row["body"] == body and row["subject"] == "Flicker'; DELETE FROM tickets"
    assert row["email"] == "ana@example.com" and row["model"] == "support-bot@1" and row["status"] == "open"
    with sqlite3.connect(tickets_path()) as conn:  # read back independently of the store's own code
        assert conn.execute("SELECT body FROM tickets WHERE id = ?", (ticket_id,)).fetchone() == (body,)
    before = len(list_tickets())
    for bad, field in [({"email": "not-an-email", "subject": "Hello", "body": "long enough body"}, "email"),
                       ({"email": "a@b.co", "subject": "x", "body": "long enough body"}, "subject"),
                       ({"email": "a@b.co", "subject": "two\nlines", "body": "long enough body"}, "subject"),
                       ({"email": "a@b.co", "subject": "Hello", "body": "short"}, "body")]:
        assert f"invalid arguments: {field}" in create.invoke(bad)
    assert len(list_tickets()) == before  # nothing half-written


def test_recipe_tools_list_selects_tools_and_names_unknown_ones(reg):
    from agentpeft.langchain import collect_tools
    from agentpeft.recipe import get_recipe

    recipe = get_recipe("support-bot")
    assert [t.name for t in collect_tools(recipe.model_copy(update={"tools": ["create_ticket"]}))] == ["create_ticket"]
    assert [t.name for t in collect_tools(recipe.model_copy(update={"tools": []}), "support-bot@1")] == [
        "ask_support-bot"]
    with pytest.raises(AgentpeftError, match=r"unknown tool\(s\) nope; registered tools: create_ticket, kb_search"):
        collect_tools(recipe.model_copy(update={"tools": ["nope"]}))


def test_plugin_tool_through_the_hook(reg):
    from langchain_core.tools import tool

    from agentpeft.hookspecs import hookimpl
    from agentpeft.langchain import collect_tools
    from agentpeft.plugins import load_plugins, pm
    from agentpeft.recipe import get_recipe

    @tool
    def shout(text: str) -> str:
        """Upper-case the text."""
        return text.upper()

    class Plugin:
        @hookimpl
        def register_tools(self, register, recipe):  # a plugin may leave out the model argument
            if recipe is not None and recipe.name == "support-bot":
                register(shout)

    load_plugins()
    pm.register(Plugin(), "test-shout")
    try:
        recipe = get_recipe("support-bot").model_copy(update={"tools": ["shout", "kb_search"]})
        tools = collect_tools(recipe)
        assert [t.name for t in tools] == ["shout", "kb_search"] and tools[0].invoke({"text": "hi"}) == "HI"
    finally:
        pm.unregister(name="test-shout")


def test_unknown_recipe_tool_fails_before_training(tiny_base, home):
    from agentpeft.pipeline.build import build
    from agentpeft.recipe import get_recipe

    recipe = get_recipe("support-bot").model_copy(update={"tools": ["kb_search", "nope"]})
    with pytest.raises(AgentpeftError, match="unknown tool"):
        build(recipe, base=str(tiny_base), show_progress=False, log=lambda s: None)
    assert not (home / "builds").exists()


# --- agents ---------------------------------------------------------------------------------------
class ScriptedChat(BaseChatModel):
    """Stands in for a tool-calling orchestrator: each step looks at the messages so far and answers."""

    steps: list[Callable[[list], AIMessage]]
    seen_tools: list[str] = []

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools, **kwargs: Any):
        self.seen_tools = [t.name for t in tools]
        return self

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        done = sum(isinstance(m, AIMessage) for m in messages)
        return ChatResult(generations=[ChatGeneration(message=self.steps[done](messages))])


def _call(name: str, args: dict, call_id: str) -> Callable[[list], AIMessage]:
    return lambda messages: AIMessage("", tool_calls=[{"name": name, "args": args, "id": call_id, "type": "tool_call"}])


def test_agent_loop_with_orchestrator_delegating_to_the_real_specialist_and_tools(reg):
    from agentpeft.langchain import create_agent, load_llm
    from agentpeft.tickets import get_ticket

    question = "How long does a refund take?"
    orchestrator = ScriptedChat(steps=[
        _call("kb_search", {"query": "how long does a refund take"}, "c1"),
        _call("ask_support-bot", {"question": question}, "c2"),
        _call("create_ticket", {"email": "bo@example.com", "subject": "Refund status",
                                "body": "Customer asks how long a refund takes."}, "c3"),
        lambda messages: AIMessage("Done: " + " | ".join(m.text for m in messages if isinstance(m, ToolMessage))),
    ])
    agent = create_agent("support-bot", model=orchestrator)
    result = agent.invoke({"messages": [HumanMessage(question)]})
    assert orchestrator.seen_tools == ["kb_search", "create_ticket", "ask_support-bot"]
    tool_messages = {m.name: m.text for m in result["messages"] if isinstance(m, ToolMessage)}
    assert "9 business days" in tool_messages["kb_search"]
    # The specialist answered for real: the same greedy reply as asking it directly.
    assert tool_messages["ask_support-bot"] == load_llm("support-bot").invoke(question).text
    ticket_id = int(tool_messages["create_ticket"].split("#")[1].split()[0])
    assert get_ticket(ticket_id)["subject"] == "Refund status"
    final = result["messages"][-1]
    assert isinstance(final, AIMessage) and final.text.startswith("Done:") and f"#{ticket_id}" in final.text


def test_agent_with_the_specialist_as_its_model(reg):
    from agentpeft.langchain import create_agent

    agent = create_agent("support-bot", tools=["kb_search"])
    result = agent.invoke({"messages": [HumanMessage("How long is the standard warranty?")]})
    final = result["messages"][-1]
    assert isinstance(final, AIMessage) and final.response_metadata.get("model_name") == "support-bot@1"
    with pytest.raises(AgentpeftError, match="has no tool 'nope'"):
        create_agent("support-bot", tools=["nope"])


# --- chat -----------------------------------------------------------------------------------------
def test_chat_streams_replies_and_runs_tools(reg):
    from agentpeft.chat import chat
    from agentpeft.tickets import list_tickets

    lines = iter(["How long is the standard warranty?", "/tools", "/kb_search refurbished warranty",
                  '/create_ticket {"email": "cy@example.com", "subject": "Broken lamp", "body": "It will not turn on."}',
                  "/create_ticket {oops", "/nope x", "/exit", "never read"])
    writes: list[str] = []

    def prompt() -> str:
        writes.append("<prompt>")
        return next(lines)

    chat("support-bot", prompt, writes.append, max_new_tokens=6, confirm=lambda question: True)
    out = "".join(w for w in writes if w != "<prompt>")
    assert out.startswith("Chatting with support-bot@1. Tools: kb_search, create_ticket.")
    reply_writes = writes[writes.index("<prompt>") + 1: writes.index("<prompt>", writes.index("<prompt>") + 1)]
    assert len([w for w in reply_writes if w.strip() or w == "\n"]) >= 3  # streamed in pieces
    assert "18 months" in out and "/create_ticket:" in out
    assert f"Ticket #{list_tickets()[-1]['id']} created for cy@example.com." in out
    assert "Error: the arguments are not valid JSON" in out and "Error: no tool 'nope'" in out


def test_chat_command_with_cli_runner(reg):
    runner = CliRunner()
    result = runner.invoke(cli, ["chat", "support-bot", "--max-new-tokens", "4"],
                           input="hello\n/kb_search how long does a refund take\n")
    assert result.exit_code == 0, result.output
    assert "9 business days" in result.output
    agent = runner.invoke(cli, ["chat", "support-bot", "--agent", "--max-new-tokens", "4"], input="hello\n/exit\n")
    assert agent.exit_code == 0, agent.output
    missing = runner.invoke(cli, ["chat", "no-such-model"])
    assert missing.exit_code == 1 and "no model named 'no-such-model'" in missing.output



# --- retrieval-augmented mode (RAFT) --------------------------------------------------------------
def test_raft_build_trains_and_evaluates_with_passages(tiny_base, home):
    from datasets import load_from_disk

    from agentpeft.langchain import load_llm
    from agentpeft.recipe import RetrievalConfig, get_recipe
    from agentpeft.registry import resolve, show
    from conftest import build_tiny

    recipe = get_recipe("support-bot")
    recipe = recipe.model_copy(update={"retrieval": RetrievalConfig(enabled=True, k=3, distractors=1, max_seq_len=1024)})
    result = build_tiny(tiny_base, "raft-bot", recipe=recipe, max_steps=1)
    train = list(load_from_disk(str(result.build_dir / "data" / "dataset-raft"))["train"])
    knowledge = [r for r in train if not r["train_only"]]
    assert knowledge and all(r["prompt"][-1]["content"].startswith("Passages:\n[1] ") for r in knowledge)
    # General pairs are trained as they are asked in use: with the passages their question retrieves
    # (unrelated ones, to be ignored), or plain where it retrieves none; no distractor is added.
    from agentpeft.retrieval import PassageIndex, augment_question, load_chunks, retrieve

    index = PassageIndex(load_chunks(resolve("raft-bot") / "kb.jsonl"))
    general = [r for r in train if r["train_only"]]
    served = [augment_question(r["question"], retrieve(index, r["question"], 3)) for r in general]
    assert [r["prompt"][-1]["content"] for r in general] == served
    assert any(s.startswith("Passages:\n[1] ") for s in served) and any(s == r["question"] for s, r in zip(served, general))
    # Each training prompt holds the top 2 passages plus 1 distractor; the refund fact is among them.
    refund = next(r for r in knowledge if "refund take" in r["question"].lower())
    content = refund["prompt"][-1]["content"]
    assert content.count("\n[") == 3 and "9 business days" in content  # [1], [2] and [3]
    assert content.endswith("Question: " + refund["question"])
    manifest = show("raft-bot")
    assert manifest["retrieval"]["enabled"] is True and manifest["metrics"]["retrieval"] is True
    # The gate compared base and tuned as they are served: both asked with the retrieved passages.
    examples = json.loads((resolve("raft-bot") / "eval.json").read_text())["examples"]
    assert examples and all(e["prompt"].startswith("Passages:\n[1] ") for e in examples)
    # At inference the specialist's prompt gets the top passages too.
    prompt = load_llm("raft-bot")._to_chat_prompt([HumanMessage("How long does a refund take?")])
    assert "Passages:\n[1] " in prompt and "9 business days" in prompt


def test_retrieval_matches_meaning_not_only_words():
    from langchain_core.documents import Document

    from agentpeft.retrieval import PassageIndex, retrieve

    index = PassageIndex([Document("To cancel, use the form in the member portal."),
                          Document("Dedicated desks come with a lockable pedestal and cost $395 a month."),
                          Document("The printer is on the second floor."),
                          Document("A replacement access card costs $22 at the front desk.")])
    assert "cancel" in retrieve(index, "How does cancelling work?", 1)[0].page_content
    assert "Dedicated" in retrieve(index, "How much a month is it to have a desk that's always mine?", 1)[0].page_content
    assert "replacement" in retrieve(index, "I left my entry card on the train. What do I pay for a new one?",
                                     1)[0].page_content
    assert retrieve(index, "Where are the printers?", 1)[0].page_content.startswith("The printer")
    assert retrieve(index, "Who wrote Pride and Prejudice?", 2) == []  # unrelated: asked as it is


def test_retrieval_gives_the_sentences_that_answer_best_first():
    import random

    from langchain_core.documents import Document

    from agentpeft.pipeline.raft import training_passages
    from agentpeft.retrieval import PassageIndex, retrieve

    index = PassageIndex([
        Document("Hot desks cost $250 a month. Dedicated desks cost $395 a month and come with a lockable pedestal. "
                 "The printer is on the second floor.", metadata={"heading": "Plans"}),
        Document("Guests can stay for three hours without a day pass. A replacement access card costs $22 at the "
                 "front desk.", metadata={"heading": "Access"}),
        Document("Parking at Pier 9 costs $16 a day.", metadata={"heading": "Parking"})])
    found = retrieve(index, "How much a month is it to have a desk that's always mine?", 3)
    assert found[0].page_content == "Dedicated desks cost $395 a month and come with a lockable pedestal."
    assert len(found) == 3 and found[0].metadata["heading"] == "Plans"
    # A sentence that ends in an abbreviation does not end there: "p.m. we" is one sentence.
    evening = PassageIndex([Document("Every Thursday at 5:30 p.m. we host drinks. Members can bring a guest.")])
    assert evening.sentences[0][1].page_content == "Every Thursday at 5:30 p.m. we host drinks."
    # A training question gets its retrieved sentences, with its answer's sentence in the last place where
    # retrieval missed it, and distractors from passages that were not retrieved.
    answer = "A replacement access card costs $22 at the front desk."
    chosen, gold = training_passages(index, "Where is the printer?", answer, 1, 0, random.Random(0))
    assert chosen == [gold] and gold.page_content == answer
    chosen, gold = training_passages(index, "What does a new access card cost?", answer, 3, 1, random.Random(0))
    assert len(chosen) == 3 and gold in chosen[:2] and chosen[-1].metadata["heading"] == "Parking"


def test_passage_embeddings_are_computed_once_per_knowledge_base(home, monkeypatch):
    from langchain_core.documents import Document

    from agentpeft.retrieval import Embedder, PassageIndex, retrieve

    docs = [Document("Dedicated desks cost $395 a month."), Document("The printer is on the second floor.")]
    PassageIndex(docs)
    assert len(list((home / "cache" / "embeddings").glob("*.safetensors"))) == 1
    embedded: list[int] = []
    call = Embedder.__call__
    monkeypatch.setattr(Embedder, "__call__", lambda self, texts, **kw: embedded.append(len(texts)) or call(self, texts, **kw))
    index = PassageIndex(docs)
    assert "printer" in retrieve(index, "Where can I print?", 1)[0].page_content
    assert embedded == [1]  # the question only: the passages' vectors came from the cache
    PassageIndex([*docs, Document("Parking costs $16 a day.")])  # another knowledge base: embedded and cached
    assert embedded == [1, 3] and len(list((home / "cache" / "embeddings").glob("*.safetensors"))) == 2
