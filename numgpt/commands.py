"""The commands, wherever numgpt is installed:

    python -m numgpt train|sample|ladder [OPTIONS]     (python -m numgpt --help lists them)
    numgpt-train, numgpt-sample, numgpt-ladder         console scripts of the same
    numgpt train|sample|ladder                          as python -m numgpt

Each takes exactly the options of python train.py, python sample.py and python -m numgpt.ladder
in a clone (train.py and sample.py call the same functions of numgpt/cli.py).
"""
import sys

COMMANDS = {"train": "train a model (python -m numgpt train --help for its options)",
            "sample": "generate text from a trained checkpoint (sample --help)",
            "ladder": "train the ladder of the video and compare with its losses (ladder --help)"}


def usage(prog):
    width = max(map(len, COMMANDS))
    lines = [f"usage: {prog} COMMAND [OPTIONS]", "",
             "A character-level GPT in NumPy with hand-written backward passes.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    lines += ["", "Installed, prepared data and compiled kernels go to $XDG_CACHE_HOME/numgpt",
              "(~/.cache/numgpt); in a clone to its data/ and kernels/__pycache__.",
              "NUMGPT_DATA_DIR and NUMBA_CACHE_DIR override them; --out_dir is relative to here."]
    return "\n".join(lines)


def main(argv=None, prog=None):
    """python -m numgpt COMMAND ... (and the console script numgpt)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if prog is None:
        prog = "python -m numgpt" if sys.argv[0].endswith("__main__.py") else "numgpt"
    if argv and argv[0] in ("-h", "--help"):
        print(usage(prog))
        return 0
    if argv and argv[0] == "--version":
        from . import __version__
        print(f"numgpt {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"error: {what}; choose one of {', '.join(COMMANDS)} (see {prog} --help)",
              file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    return {"train": train, "sample": sample, "ladder": ladder}[name](rest, f"{prog} {name}")


def train(argv=None, prog="numgpt-train"):
    from .cli import run, train_main
    return run(lambda args: train_main(args, prog=prog), keep_going=True, argv=argv)


def sample(argv=None, prog="numgpt-sample"):
    from .cli import run, sample_main
    return run(lambda args: sample_main(args, prog=prog), argv=argv)


def ladder(argv=None, prog="numgpt-ladder"):
    from .ladder import main as ladder_main
    return ladder_main(argv, prog=prog)
