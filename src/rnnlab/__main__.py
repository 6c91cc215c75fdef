"""`python -m rnnlab`: the same as the `rnnlab` command."""
from .cli import entry_point

entry_point()
