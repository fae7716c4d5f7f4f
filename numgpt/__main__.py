"""python -m numgpt train|sample|ladder [OPTIONS]: see numgpt/commands.py."""
import sys

from numgpt.commands import main

if __name__ == "__main__":
    sys.exit(main())
