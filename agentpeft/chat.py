"""``agentpeft chat``: a terminal chat with a registered model, streamed, with its recipe's tools."""

from __future__ import annotations

import json
from typing import Callable

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, StructuredTool

from .errors import AgentpeftError

HELP = ("/tools lists the tools; /TOOL ARGS runs one (ARGS: JSON, or text for its first field); "
        "/reset forgets the conversation; /exit (or Ctrl-D) quits.")


def has_side_effects(tool: BaseTool) -> bool:
    """Whether a tool changes something outside the conversation (opens a ticket, sends a message): a tool
    says so with ``metadata={"side_effects": True}``, as ``create_ticket`` does."""
    return bool((tool.metadata or {}).get("side_effects"))


def confirmed(tool: BaseTool, confirm: Callable[[str], bool]) -> BaseTool:
    """``tool`` asking ``confirm(question)`` before each run, whoever calls it (a /command or the model);
    a declined call does nothing and returns a line saying so, which the model then reads."""

    def run(**kwargs) -> str:
        if not confirm(f"Run {tool.name} {json.dumps(kwargs, ensure_ascii=False, default=str)}?"):
            return f"Not run: the user declined {tool.name}; nothing was done."
        return str(tool.invoke(kwargs))

    return StructuredTool.from_function(
        func=run, name=tool.name, description=tool.description, args_schema=tool.args_schema,
        metadata=tool.metadata, handle_tool_error=tool.handle_tool_error,
        handle_validation_error=tool.handle_validation_error)


def tool_arguments(tool: BaseTool, text: str) -> dict:
    """A tool's arguments from a command line: a JSON object, or plain text for its first required field."""
    text = text.strip()
    if text.startswith("{"):
        try:
            args = json.loads(text)
        except ValueError as exc:
            raise AgentpeftError(f"the arguments are not valid JSON ({exc}); e.g. /{tool.name} {{...}}") from None
        if not isinstance(args, dict):
            raise AgentpeftError("the arguments must be a JSON object")
        return args
    fields = tool.args_schema.model_json_schema() if tool.args_schema else {}
    required = fields.get("required") or list(fields.get("properties") or {})
    if not required:
        return {}
    return {required[0]: text}


def run_tool_command(tools: dict[str, BaseTool], line: str) -> str:
    """Run ``/TOOL ARGS`` and return the tool's output (errors as text)."""
    name, _, rest = line[1:].partition(" ")
    if name not in tools:
        raise AgentpeftError(f"no tool {name!r}; tools: {', '.join(tools) or 'none'}")
    return str(tools[name].invoke(tool_arguments(tools[name], rest)))


def chat(name: str, prompt: Callable[[], str], write: Callable[[str], None], agent: bool = False,
         max_new_tokens: int = 256, confirm: Callable[[str], bool] | None = None) -> None:
    """The chat loop: ``prompt()`` reads a line (EOFError ends), ``write`` prints without a newline.

    Replies stream token by token. With ``agent`` the model may call the tools itself (a LangChain
    agent with the specialist as its model); otherwise tools run on ``/TOOL ARGS`` commands. A tool with
    side effects (:func:`has_side_effects`: ``create_ticket``) runs only when ``confirm(question)`` returns
    True, so a knowledge-base page or a reply cannot open tickets on its own; without ``confirm`` every
    such call is declined.
    """
    from .langchain import ask_tool_name, create_agent, get_tools, load_llm

    llm = load_llm(name, max_new_tokens=max_new_tokens)
    ask = confirm or (lambda question: False)
    tools = {t.name: confirmed(t, ask) if has_side_effects(t) else t
             for t in get_tools(name) if t.name != ask_tool_name(llm.model_id)}
    runner = create_agent(name, tools=list(tools.values())) if agent else None
    write(f"Chatting with {llm.model_id}. Tools: {', '.join(tools) or 'none'}. {HELP}\n")
    history: list[BaseMessage] = []
    while True:
        try:
            line = prompt().strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history.clear()
            write("(conversation cleared)\n")
            continue
        if line in ("/tools", "/help"):
            write("".join(f"  /{t.name}: {t.description}\n" for t in tools.values()) + HELP + "\n")
            continue
        if line.startswith("/"):
            try:
                write(run_tool_command(tools, line) + "\n")
            except AgentpeftError as exc:
                write(f"Error: {exc}\n")
            continue
        history.append(HumanMessage(content=line))
        if runner is None:
            text = ""
            for chunk in llm.stream(history):
                text += chunk.text
                write(chunk.text)
            history.append(AIMessage(content=text))
            write("\n")
        else:
            history[:] = _agent_turn(runner, history, write)


def _agent_turn(runner, history: list[BaseMessage], write: Callable[[str], None]) -> list[BaseMessage]:
    """One user turn through the agent, streaming its tokens and tool results; the new history."""
    final = history
    for mode, payload in runner.stream({"messages": history}, stream_mode=["messages", "values"]):
        if mode == "values":
            final = payload["messages"]
            continue
        message, _ = payload
        if isinstance(message, AIMessageChunk) and message.text:
            write(message.text)
        elif isinstance(message, ToolMessage):
            write(f"\n[{message.name}] {message.text}\n")
    write("\n")
    return list(final)
