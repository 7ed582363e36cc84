"""Technique implementations, one package per family; each family declares its methods in a
torch-free ``decl.py`` that ``config.methods()`` finds on disk (the handlers load on first apply)."""
