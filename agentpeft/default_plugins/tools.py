"""Built-in agent tools: kb_search, ask_<model> and support-bot's create_ticket."""

from __future__ import annotations

import re
from pathlib import Path

from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import BaseModel, Field, ValidationError, field_validator

from ..errors import AgentpeftError
from ..hookspecs import hookimpl

_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def validation_message(error: ValidationError) -> str:
    """A pydantic error as one line the calling model (or person) can act on."""
    parts = [f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in error.errors()]
    return "invalid arguments: " + "; ".join(parts) + ". Fix them and call the tool again."


class KbSearchArgs(BaseModel):
    query: str = Field(min_length=1, max_length=500, description="What to look up, in a few words")
    k: int = Field(3, ge=1, le=10, description="How many passages to return")


class AskArgs(BaseModel):
    question: str = Field(min_length=1, max_length=4000, description="A complete, self-contained question")


class TicketArgs(BaseModel):
    email: str = Field(max_length=254, description="The customer's e-mail address")
    subject: str = Field(min_length=3, max_length=150, description="One-line summary of the problem")
    body: str = Field(min_length=10, max_length=5000, description="The problem in the customer's words")

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        v = v.strip()
        if not _EMAIL.fullmatch(v):
            raise ValueError("not a valid e-mail address (expected name@example.com)")
        return v

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str) -> str:
        v = v.strip()
        if "\n" in v or "\r" in v or _CONTROL.search(v):
            raise ValueError("must be a single line without control characters")
        return v

    @field_validator("body")
    @classmethod
    def _body(cls, v: str) -> str:
        if _CONTROL.search(v):
            raise ValueError("must not contain control characters")
        return v


def _chunks_source(recipe, model: str | None):
    """Where kb_search reads its chunks: the registry entry's kb.jsonl, else the recipe's knowledge base."""
    from ..registry import resolve
    from ..retrieval import KB_FILE, load_chunks

    def load():
        if model is not None:
            stored = resolve(model) / KB_FILE
            if stored.is_file():
                return load_chunks(stored)
        if recipe is not None and recipe.kb_path is not None and Path(recipe.kb_path).exists():
            from ..pipeline.ingest import ingest

            return ingest(recipe.kb_path, recipe.data.loaders, follow_external_links=recipe.data.follow_external_links)
        raise ToolException("this model carries no knowledge base to search (rebuild it to store one)")

    return load


def kb_search_tool(recipe=None, model: str | None = None) -> BaseTool:
    """Semantic search over the knowledge base of a registered model (or of a recipe)."""
    from ..retrieval import PassageIndex, cite, passage_text

    load = _chunks_source(recipe, model)
    index: list[PassageIndex] = []

    def kb_search(query: str, k: int = 3) -> str:
        try:
            if not index:
                index.append(PassageIndex(load()))
        except AgentpeftError as exc:
            raise ToolException(str(exc)) from None
        hits = index[0].search(query, k)
        if not hits:
            return f"No passage in the knowledge base matches {query!r}."
        return "\n\n".join(f"[{i}] ({cite(doc)}) {passage_text(doc)}" for i, (doc, _) in enumerate(hits, 1))

    topic = (recipe.description if recipe is not None and recipe.description else "the knowledge base")
    return StructuredTool.from_function(
        func=kb_search, name="kb_search", args_schema=KbSearchArgs,
        description=f"Search the knowledge base ({topic}) and return the best-matching passages with sources.",
        handle_tool_error=True, handle_validation_error=validation_message)


def ask_tool(model: str, description: str = "") -> BaseTool:
    """The registered specialist as a tool, so any agent can delegate questions to it."""
    from ..chat_models import load_llm
    from ..tools import ask_tool_name

    def ask(question: str) -> str:
        return load_llm(model).invoke(question).text

    return StructuredTool.from_function(
        func=ask, name=ask_tool_name(model), args_schema=AskArgs,
        description=f"Ask {model}, a fine-tuned specialist{': ' + description if description else ''}. "
                    "Pass one self-contained question; it answers briefly.",
        handle_tool_error=True, handle_validation_error=validation_message)


def create_ticket_tool(model: str | None = None) -> BaseTool:
    """Open a support ticket in the local SQLite store; returns the ticket id."""
    from ..tickets import create_ticket as store

    def create_ticket(email: str, subject: str, body: str) -> str:
        try:
            ticket_id = store(email, subject, body, model=model)
        except AgentpeftError as exc:
            raise ToolException(str(exc)) from None
        return f"Ticket #{ticket_id} created for {email}."

    return StructuredTool.from_function(
        func=create_ticket, name="create_ticket", args_schema=TicketArgs,
        description="Open a support ticket for a customer when the question cannot be answered or they ask "
                    "for a person. Needs the customer's e-mail, a one-line subject and the problem.",
        metadata={"side_effects": True},  # agentpeft chat asks before each call
        handle_tool_error=True, handle_validation_error=validation_message)


@hookimpl
def register_tools(register, recipe, model):
    if recipe is not None or model is not None:
        register(kb_search_tool(recipe, model))
    register(create_ticket_tool(model))
    if model is not None:
        register(ask_tool(model, recipe.description if recipe is not None else ""))
