"""Train a character-level GPT: python train.py [--preset=NAME] [--key=value ...]  (see --help)"""
import sys

from numgpt.cli import run, train_main

if __name__ == "__main__":
    sys.exit(run(train_main, keep_going=True))
