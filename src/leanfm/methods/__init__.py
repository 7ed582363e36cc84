"""Technique implementations, one package per family; each family declares its methods in a
torch-free ``decl.py`` that ``config.methods()`` finds on disk (the handlers load on first apply)."""


def lazy_exports(package: str, exports: dict[str, str]):
    """PEP 562 ``(__getattr__, __dir__)`` for a method package: each public name is imported
    from its submodule (``exports``: name -> submodule) on first use, so importing the package
    (or its torch-free ``decl``) loads no torch."""
    import sys
    from importlib import import_module

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{exports[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
