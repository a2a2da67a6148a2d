"""agentpeft: turn a knowledge base into a specialized, evaluated, fine-tuned LLM for LangChain agents."""

__version__ = "0.1.0"
