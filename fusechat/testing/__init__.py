"""Tiny, locally built models with the real source families' tokenizer conventions, for tests and demos;
a local Ray head for the Ray tests and bench (`ray_head`)."""
