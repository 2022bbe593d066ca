"""Runnable examples of flashjax (`python -m examples.gpt2.train`)."""
