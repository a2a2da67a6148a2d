"""Tools in a model's own chat-template format where its template has tool support, agentpeft's
``<tool_call>`` protocol in the system prompt where it has none."""

from __future__ import annotations

import json

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

#: A Qwen2.5-style template: the tools in the system turn, calls as <tool_call> blocks, results in turns of
#: their own (Qwen2.5 itself puts them in user turns; a role of their own tells them apart from agentpeft's).
TOOL_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are helpful.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\nCall a function as <tool_call>\\n{\"name\": <name>, \"arguments\": <object>}\\n"
    "</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}{%- set call = call.function %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' + (call.arguments | tojson) + '}\\n"
    "</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}{{- '<|im_start|>tool\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
#: SmolLM2-135M-Instruct's template: no tool support.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "kb_search", "description": "Search the knowledge base.",
                                           "parameters": {"type": "object",
                                                          "properties": {"query": {"type": "string"}}}}}]
CALL = {"name": "kb_search", "args": {"query": "refund"}, "id": "c1", "type": "tool_call"}
HISTORY = [HumanMessage("refund?"), AIMessage("", tool_calls=[CALL]),
           ToolMessage("Refunds take 9 business days.", tool_call_id="c1", name="kb_search")]


@pytest.fixture(scope="module")
def tiny_model(tiny_base):
    from agentpeft.models import load_model

    return load_model(tiny_base)


def _chat(tiny_base, model, template: str):
    from agentpeft.chat_models import _chat as make
    from agentpeft.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_base)
    tokenizer.chat_template = template
    return make(model, tokenizer, "base:tiny", "You answer support questions.")


def test_tool_format_follows_the_chat_template(tiny_base):
    from agentpeft.models import load_tokenizer, tool_format

    tokenizer = load_tokenizer(tiny_base)
    assert tool_format(tokenizer) == "agentpeft"  # the tiny base's ChatML template
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    assert tool_format(tokenizer) == "agentpeft"
    tokenizer.chat_template = TOOL_TEMPLATE
    assert tool_format(tokenizer) == "chat-template"
    # Naming tools without rendering them is no tool support.
    tokenizer.chat_template = "{# no tools here #}" + SMOLLM2_TEMPLATE
    assert tool_format(tokenizer) == "agentpeft"


def test_a_tool_aware_template_renders_tools_calls_and_results_itself(tiny_base, tiny_model):
    chat = _chat(tiny_base, tiny_model, TOOL_TEMPLATE)
    assert chat.tool_format == "chat-template"
    prompt = chat._to_chat_prompt(HISTORY, TOOLS)
    expected = chat.tokenizer.apply_chat_template(
        [{"role": "system", "content": "You answer support questions."},
         {"role": "user", "content": "refund?"},
         {"role": "assistant", "content": "",
          "tool_calls": [{"type": "function", "function": {"name": "kb_search", "arguments": {"query": "refund"}}}]},
         {"role": "tool", "content": "Refunds take 9 business days.", "name": "kb_search"}],
        tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert prompt == expected
    assert json.dumps(TOOLS[0]) in prompt.split("<|im_end|>")[0]  # the schema as the template renders it
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "kb_search", "arguments": {"query": "refund"}}\n' in prompt
    assert "<|im_start|>tool\nRefunds take 9 business days.<|im_end|>" in prompt
    assert "<tool_response>" not in prompt and "You can call these tools" not in prompt
    # Without tools bound, the template renders no tool list.
    assert "<tools>" not in chat._to_chat_prompt([HumanMessage("hi")])


def test_replies_in_the_template_format_parse_into_tool_calls(tiny_base, tiny_model, monkeypatch):
    from langchain_core.outputs import Generation, LLMResult
    from langchain_huggingface import HuggingFacePipeline

    from agentpeft.chat_models import parse_tool_calls

    chat = _chat(tiny_base, tiny_model, TOOL_TEMPLATE)
    reply = '<tool_call>{"name": "kb_search", "arguments": {"query": "x"}}</tool_call>'
    monkeypatch.setattr(HuggingFacePipeline, "_generate",
                        lambda self, prompts, **kw: LLMResult(generations=[[Generation(text=reply)]]))
    message = chat.bind_tools(TOOLS).invoke("refund?")
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("kb_search", {"query": "x"})]
    assert message.content == "" and message.response_metadata["finish_reason"] == "tool_calls"
    # Tolerant: Qwen's line breaks, Llama 3.1's bare JSON with "parameters", arguments as a JSON string.
    for text in ('<tool_call>\n{"name": "kb_search", "arguments": {"query": "x"}}\n</tool_call>',
                 '{"name": "kb_search", "parameters": {"query": "x"}}',
                 '[{"name": "kb_search", "arguments": "{\\"query\\": \\"x\\"}"}]'):
        _, calls, invalid = parse_tool_calls(text, bare_json=True)
        assert [(c["name"], c["args"]) for c in calls] == [("kb_search", {"query": "x"})] and not invalid, text
    assert parse_tool_calls('{"answer": 9}', bare_json=True) == ('{"answer": 9}', [], [])
    assert parse_tool_calls('{"name": "kb_search", "parameters": {}}')[1] == []  # bare JSON only when asked


def test_a_template_without_tools_keeps_the_agentpeft_protocol(tiny_base, tiny_model):
    from agentpeft.chat_models import _tool_instructions

    chat = _chat(tiny_base, tiny_model, SMOLLM2_TEMPLATE)
    assert chat.tool_format == "agentpeft"
    prompt = chat._to_chat_prompt(HISTORY, TOOLS)
    system = f"You answer support questions.\n\n{_tool_instructions(TOOLS)}"
    assert prompt == chat.tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": "refund?"},
         {"role": "assistant", "content": '<tool_call>{"name": "kb_search", "arguments": {"query": "refund"}}</tool_call>'},
         {"role": "user", "content": "<tool_response>\nRefunds take 9 business days.\n</tool_response>"}],
        tokenize=False, add_generation_prompt=True)


def test_the_model_card_says_which_tool_format_the_model_uses():
    from agentpeft.registry import model_card

    manifest = {"name": "bot", "version": 1, "recipe": "support-bot", "description": "",
                "base_model": {"name": "b", "sha256": "0" * 64}, "agentpeft_version": "0", "created": "now",
                "dataset": {"facts": 1, "splits": {"train": 1, "eval": 1}, "hash": "0" * 64},
                "train": {"config": {"method": "lora"}}, "merge": None,
                "metrics": {"primary": "key_fact", "base": {"key_fact": 0.1}, "tuned": {"key_fact": 0.2}}}
    assert "tool_format" not in model_card(manifest)
    assert "(`tool_format: chat-template`)" in model_card({**manifest, "tool_format": "chat-template"})
    assert "(`tool_format: agentpeft`)" in model_card({**manifest, "tool_format": "agentpeft"})


def test_a_build_records_its_tool_format_in_the_manifest_and_card(registered, monkeypatch):
    from agentpeft.langchain import load_llm
    from agentpeft.registry import resolve, show

    monkeypatch.setenv("AGENTPEFT_HOME", str(registered["home"]))
    assert show("support-bot")["tool_format"] == load_llm("support-bot").tool_format == "agentpeft"
    assert "(`tool_format: agentpeft`)" in (resolve("support-bot") / "README.md").read_text()
