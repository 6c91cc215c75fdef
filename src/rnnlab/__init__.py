"""rnnlab: character-level recurrent language models, from d2l §8.5 and beyond.

The public API is small and imports no torch (the torch backend loads only when asked for).
"""
__version__ = "0.1.0"

from .config import DataConfig, GenerateConfig, ModelConfig, TrainConfig
from .errors import RnnlabError
from .text import Vocab, load_corpus, preprocess, tokenize

__all__ = ["DataConfig", "GenerateConfig", "ModelConfig", "RnnlabError", "TrainConfig", "Vocab",
           "load_corpus", "preprocess", "tokenize", "__version__"]
