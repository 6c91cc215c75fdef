"""The `rnnlab` command and `python -m rnnlab`: a guard around the command line.

This module imports nothing heavy. The command line (numpy, the configs, the training code) is imported
inside the guard, so Ctrl-C at any moment after start-up, even while those modules load, ends with
"rnnlab: interrupted" and exit status 130 rather than a traceback.
"""
import sys

INTERRUPTED = 130      # 128 + SIGINT, what shells report for a command stopped by Ctrl-C


def main() -> None:
    try:
        from .cli import main as cli_main
        code = cli_main()
    except KeyboardInterrupt:
        print("rnnlab: interrupted", file=sys.stderr)
        code = INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    main()
