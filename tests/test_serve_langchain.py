"""`agentpeft serve` through langchain-openai's ChatOpenAI: plain, streamed, with tools bound, and refused."""

from __future__ import annotations

import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.tools import tool

from test_serve import QUESTION, httpd, server, start  # noqa: F401  (the served support-bot@1)

langchain_openai = pytest.importorskip("langchain_openai")
ASK = QUESTION[0]["content"]


@pytest.fixture
def chat(server):  # noqa: F811
    return langchain_openai.ChatOpenAI(base_url=server, api_key="unused", model="support-bot", max_retries=0,
                                       temperature=0, max_tokens=8)


def test_plain_call(chat):
    reply = chat.invoke(ASK)
    assert isinstance(reply, AIMessage) and isinstance(reply.content, str)
    assert reply.response_metadata["model_name"] == "support-bot@1"  # the served version
    assert reply.usage_metadata["output_tokens"] >= 1


def test_streamed_call_adds_up_to_the_plain_reply(chat):
    chunks = list(chat.stream(ASK, stream_usage=True))
    assert len(chunks) > 1 and all(isinstance(c, AIMessageChunk) for c in chunks)
    whole = sum(chunks[1:], chunks[0])
    assert whole.content == chat.invoke(ASK).content  # greedy: the same reply, streamed
    assert whole.usage_metadata["output_tokens"] >= 1  # stream_options.include_usage


def test_call_with_tools_bound(chat):
    @tool
    def lookup_order(order_id: str) -> str:
        """Look up an order's status by its id."""
        return "shipped"

    reply = chat.bind_tools([lookup_order]).invoke(ASK)
    assert isinstance(reply, AIMessage)
    # Whatever the tiny model says, ChatOpenAI parsed the reply: text, tool calls, or both.
    assert isinstance(reply.content, str) and isinstance(reply.tool_calls, list)
    assert all(call["name"] == "lookup_order" for call in reply.tool_calls)


def test_invalid_requests_get_openai_shaped_errors(chat, server):  # noqa: F811
    with pytest.raises(openai.BadRequestError) as err:
        chat.invoke(ASK, temperature=5)
    assert err.value.status_code == 400
    assert err.value.body["type"] == "invalid_request_error" and "temperature" in err.value.body["message"]
    other = langchain_openai.ChatOpenAI(base_url=server, api_key="unused", model="gpt-4o", max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        other.invoke(ASK)
    assert err.value.body["code"] == "model_not_found"
