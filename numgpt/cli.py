"""Command lines of train.py and sample.py: --key=value parsing and one-line errors."""
import argparse
import errno
import os
import signal
import sys

import numpy as np

from .checkpoint import CheckpointError, read_model_checkpoint
from . import streams
from .config import FIELDS, PRESETS, ConfigError, get_config, parse_whole_number
from .data import DataError, Vocab, load_dataset, strip_bom
from .distributed import end_with_error, get_world
from .env import FALSE, TRUE, EnvError, check_all, mpi_launch
from .trainer import TrainingError



class OutputError(Exception):
    """The output stream (stdout) cannot be written; the message is one line naming it."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, EnvError)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2, for the commands that
    take argparse options (the ladder, the gradient checks)."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv, known, flags=()):
    """--key=value or --key value pairs (and bare --flag for names in flags) -> dict; anything
    else is refused: an unknown option, a missing value, an option given twice."""
    out = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in known and key not in flags:
            raise ConfigError(f"unknown option --{key}; see --help")
        if not eq:
            if key in flags:
                out[key] = True
                continue
            if not args or args[0].startswith("--"):
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            value = args.pop(0)  # --key value
        if key in flags:  # --resume=false and the like
            v = value.strip().lower()
            if v not in TRUE + FALSE:
                raise ConfigError(f"--{key} is a switch: --{key}, or --{key}=true / false")
            value = v in TRUE
        if key in out:
            raise ConfigError(f"--{key} is given twice")
        out[key] = value
    return out


def guard_streams(keep_going):
    """Make the standard streams safe to use whatever the caller did with them.

    Descriptors 0-2 that are closed get os.devnull (so no file opened later takes their place).
    stderr, and with keep_going also stdout, becomes a streams.Guarded: a write that fails (the
    stream was closed at start, the reader of a pipe left, the disk is full, the terminal went
    away) drops that stream's output from then on and the program goes on. Without keep_going a
    stdout closed at start stays None, for the command to refuse to run."""
    streams.fill_closed_fds()
    for stream in (sys.stdout, sys.stderr):  # a character the terminal cannot show is escaped
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    if keep_going:
        if sys.stdout is None:
            sys.stdout = streams.open_devnull_text()
        sys.stdout = streams.Guarded(sys.stdout, "stdout", on_error=streams.warn_lost)
    if sys.stderr is None:
        sys.stderr = streams.open_devnull_text()
    sys.stderr = streams.Guarded(sys.stderr, "stderr")


def run(main, keep_going=False, argv=None):
    """Run main(argv) (argv: sys.argv[1:] unless given), turning the user's errors into one line
    on stderr and exit status 2/1.

    keep_going: output that cannot be written (closed or broken stdout or stderr) is dropped and
    main goes on (train.py: the checkpoint is the product). Without it, a stdout that cannot be
    written ends main with a one-line error, or quietly when the reader of a pipe left."""
    guard_streams(keep_going)

    fired = []

    def stop(signum, frame):  # Ctrl-C, SIGTERM or SIGHUP outside the training loop
        if fired:  # delivered twice (wrappers forward signals), or sent again while exiting
            return
        fired.append(signum)
        raise KeyboardInterrupt
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, stop)
    except ValueError:  # not the main thread
        pass
    # under MPI an error is said once for the whole job, which it ends (distributed.py)
    fail = end_with_error
    try:
        check_all()
        return main(sys.argv[1:] if argv is None else argv) or 0
    except USER_ERRORS as e:
        return fail(f"error: {e}", 2)
    except TrainingError as e:
        return fail(f"error: {e}", 1)
    except KeyboardInterrupt:
        return fail("interrupted (any checkpoint already written is intact)", 130)
    except BrokenPipeError:  # e.g. python sample.py | head: the reader left, nothing to say
        streams.discard(sys.stdout)
        return fail(None, 1)
    except OutputError as e:
        streams.discard(sys.stdout)  # what is still buffered must not fail again at exit
        return fail(f"error: {e}", 1)
    except OSError as e:  # an I/O failure the code above did not foresee: still one line
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return fail(f"error: {e.strerror or e}{where}", 1)
    except MemoryError:
        return fail("error: out of memory; use a smaller model, --batch_size or --block_size", 1)


TRAIN_HELP = f"""usage: python train.py [--preset=NAME] [--data=FILE] [--out_dir=DIR] [--resume] [--key=value ...]

Trains a character-level GPT (default preset: laptop, for 10 minutes) on Tiny Shakespeare or any
UTF-8 text file.
  --preset=NAME   one of: {', '.join(PRESETS)}
  --data=FILE     a UTF-8 text file to train on (default: Tiny Shakespeare, fetched if missing)
  --out_dir=DIR   where ckpt.npz, log.jsonl and loss.png go (default: out)
  --resume        continue the run in out_dir: its config and length (as fixed when it
                  started), unless --preset or other options are given
  --max_time=T    train for a time budget T (90s, 10m, 1.5h, or seconds): the number of steps is
                  fixed from the step's speed measured at the start; --max_iters=N instead trains
                  N steps (the two cannot be combined)
  --key=value     any config field: {', '.join(FIELDS)}
"""


def _usage(text, script, prog):
    """text with its usage lines naming the command as the user called it: python train.py in a
    clone, numgpt-train or python -m numgpt train where numgpt is installed (numgpt/commands.py)."""
    old, new = "usage: " + script + " ", "usage: " + prog + " "
    return text.replace(old, new, 1).replace("\n" + " " * len(old), "\n" + " " * len(new))


def check_data_path(data):
    """Refuse an empty --data (the path checks themselves are data.check_text_file's)."""
    if not data:
        raise DataError("--data is empty; give a UTF-8 text file, or leave --data out to train "
                        "on Tiny Shakespeare")


def train_main(argv, prog="python train.py"):
    if any(a in ("-h", "--help") for a in argv):
        print(_usage(TRAIN_HELP, "python train.py", prog))
        return 0
    from .trainer import train
    world = get_world()  # under mpiexec: this rank's (numgpt/distributed.py)
    opts = parse_flags(argv, set(FIELDS) | {"preset", "data", "out_dir"}, flags=("resume",))
    if "vocab_size" in opts:
        raise ConfigError("vocab_size is set by the data (its number of distinct characters); "
                          "drop --vocab_size")
    preset = opts.pop("preset", None)
    data = opts.pop("data", None)
    out_dir = opts.pop("out_dir", "out")
    resume = bool(opts.pop("resume", False))
    if not out_dir:
        raise ConfigError("--out_dir is empty; give the folder for the run, e.g. --out_dir=out")
    if data is not None:
        check_data_path(data)
    # --resume without --preset continues the run's own config (the options given change it,
    # as far as a resumed run may change: trainer.RESUME_MAY_CHANGE); with --preset, that preset
    # and the options must give the run's config
    base = None
    if resume and preset is None:
        base = world.from_root(lambda: _run_config_in(out_dir), "reading the checkpoint")
    cfg = get_config(preset or "laptop", base=base, **opts)
    # rank 0 reads it; a text too short for the block is refused before it is prepared
    ds = world.from_root(lambda: load_dataset(data, cfg.block_size), "sending the data")
    train(cfg, ds, out_dir, resume=resume, world=world, max_time_given="max_time" in opts)
    return 0


def _run_config_in(out_dir):
    """The config in out_dir's checkpoint, or None where there is none (train says so then)."""
    from .trainer import CKPT
    path = os.path.join(out_dir, CKPT)
    if not os.path.isfile(path):
        return None
    return read_model_checkpoint(path)[0]


SAMPLE_HELP = """usage: python sample.py [--out_dir=DIR] [--start=TEXT|FILE:path] [--num_samples=N]
                        [--max_new_tokens=N] [--temperature=T] [--top_k=K] [--top_p=P] [--seed=S]

Generates text from the checkpoint in out_dir, streaming it as it is sampled.
  --out_dir=DIR          the run whose ckpt.npz to sample from (default: out)
  --start=TEXT           the prompt the samples continue (default: a newline); FILE:path reads
                         it from a UTF-8 file (the model sees its last block_size characters)
  --num_samples=N        how many samples, each from the prompt (default: 1)
  --max_new_tokens=N     characters generated per sample (default: 500)
  --temperature=T        divides the logits before sampling: lower is more conservative, 0 always
                         takes the most likely character (default: 0.8)
  --top_k=K              sample only among the K most likely characters (default: 0, off)
  --top_p=P              nucleus sampling: only among the most likely characters whose
                         probabilities add up to P (default: 1.0, off)
  --seed=S               the random seed: the same seed gives the same samples (default: 1337)
"""

SAMPLE_DEFAULTS = {"out_dir": "out", "start": "", "num_samples": "1", "max_new_tokens": "500",
                   "temperature": "0.8", "top_k": "0", "top_p": "1.0", "seed": "1337"}


MAX_PROMPT_BYTES = 16 << 20


def _num(opts, key, typ, ok, what):
    """opts[key] read as typ (int: config.parse_whole_number, the rule train.py follows too)."""
    try:
        v = parse_whole_number(opts[key]) if typ is int else typ(opts[key])
    except ValueError:
        raise ConfigError(f"--{key} must be {what}, got {opts[key]!r}") from None
    if not ok(v):
        raise ConfigError(f"--{key} must be {what}, got {opts[key]!r}")
    return v


def sample_main(argv, prog="python sample.py"):
    if any(a in ("-h", "--help") for a in argv):
        print(_usage(SAMPLE_HELP, "python sample.py", prog))
        return 0
    from .generate import generate
    from .model import GPT
    launch = mpi_launch()
    if launch is not None and launch[1] != 1:  # every rank would print its own samples
        raise ConfigError("sample.py samples in one process; run it without mpiexec")
    opts = dict(SAMPLE_DEFAULTS)
    opts.update(parse_flags(argv, set(SAMPLE_DEFAULTS)))
    if not opts["out_dir"]:
        raise ConfigError("--out_dir is empty; give the folder of the run, e.g. --out_dir=out")
    if streams.is_closed(sys.stdout):
        raise OutputError("cannot write the output (stdout): it is closed; run sample.py with "
                          "its output going to a terminal, a file or a pipe")
    n = _num(opts, "num_samples", int, lambda v: v >= 1, "a whole number >= 1")
    max_new = _num(opts, "max_new_tokens", int, lambda v: v >= 0,
                   "a whole number >= 0, such as 500")
    temperature = _num(opts, "temperature", float, lambda v: 0 <= v < float("inf"),
                       "a number >= 0")
    top_k = _num(opts, "top_k", int, lambda v: v >= 0, "a whole number >= 0 (0 = off)")
    top_p = _num(opts, "top_p", float, lambda v: 0 < v <= 1, "a number in (0, 1]")
    seed = _num(opts, "seed", int, lambda v: v >= 0, "a whole number >= 0")
    start = opts["start"]
    if start.startswith("FILE:"):
        path = start[5:]
        if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
            raise DataError(f"the prompt file {path} is not a regular file")
        if os.path.isfile(path) and os.path.getsize(path) > MAX_PROMPT_BYTES:
            raise DataError(f"the prompt file {path} is larger than {MAX_PROMPT_BYTES >> 20} MB; "
                            "the model sees only its last block_size characters anyway")
        try:
            with open(path, encoding="utf-8") as f:
                start = strip_bom(f.read())
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read the prompt file {path}: {e}") from None
    ckpt = os.path.join(opts["out_dir"], "ckpt.npz")
    if not os.path.isfile(ckpt):
        raise CheckpointError(f"no checkpoint at {ckpt}; train one first with "
                              f"{prog.replace('sample', 'train')} (or pass --out_dir)")
    cfg, chars, params, _, _ = read_model_checkpoint(ckpt)
    vocab = Vocab(chars)
    model = GPT(cfg, dtype=np.float32, params=params)
    if cfg.kernels and cfg.model == "gpt":
        from numgpt import kernels
        kernels.warmup_decode("float32")
    if not start:
        start = "\n" if "\n" in vocab.stoi else vocab.chars[0]
    ids = vocab.encode(start)
    rng = np.random.default_rng(seed)
    out = sys.stdout

    def put(text):
        try:
            out.write(text)
            out.flush()
        except OSError as e:
            if e.errno == errno.EPIPE:  # the reader left (| head): quiet, as run() handles it
                raise BrokenPipeError(e.errno, e.strerror) from None
            raise OutputError(f"cannot write the output (stdout): {e.strerror or e}") from None
    for i in range(n):
        put(start)
        generate(model, ids[None, :], max_new, temperature, top_k or None,
                 top_p if top_p < 1 else None, rng, on_token=lambda tok: put(vocab.decode(tok)))
        put("\n" + ("---------------\n" if i < n - 1 else ""))
    return 0
