"""Tiny, locally built models with the real source families' tokenizer conventions, for tests and demos."""
