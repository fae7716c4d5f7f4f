"""Sample from a trained checkpoint: python sample.py [--out_dir=DIR] [--start=TEXT] ...  (see --help)"""
import sys

from numgpt.cli import run, sample_main

if __name__ == "__main__":
    sys.exit(run(sample_main))
