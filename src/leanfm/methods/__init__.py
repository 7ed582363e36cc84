"""Technique implementations. ``methods.builtin`` imports (and so registers) every built-in one."""
