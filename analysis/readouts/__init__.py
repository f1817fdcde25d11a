"""Readouts and science: the 2x2 factorial, the difference lens, the saved lens, tracked tokens, tokens as text."""
