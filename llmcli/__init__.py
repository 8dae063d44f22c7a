"""llm: build a GPT-style language model from scratch and understand every step of it."""

__version__ = "0.1.0"
