"""rnnlab: character-level recurrent language models, from d2l §8.5 and beyond.

The public API is small and imports nothing until a name is used (PEP 562): `import rnnlab` loads neither
numpy nor torch, so the command line starts, and answers Ctrl-C, before any heavy import.
"""
__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {"DataConfig": "config", "GenerateConfig": "config", "ModelConfig": "config",
            "TrainConfig": "config", "RnnlabError": "errors", "Vocab": "text", "load_corpus": "text",
            "preprocess": "text", "tokenize": "text"}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    from importlib import import_module
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
