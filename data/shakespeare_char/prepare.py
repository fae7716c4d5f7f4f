"""Prepare Tiny Shakespeare: train.bin / val.bin (uint16) and vocab.json in this folder
(in $NUMGPT_DATA_DIR/shakespeare_char when that is set).

    python data/shakespeare_char/prepare.py            # a local copy, else download (sha256-checked)
    python data/shakespeare_char/prepare.py PATH       # from a copy of input.txt you already have
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from numgpt.data import (SHAKESPEARE_DIR, SHAKESPEARE_SHA256, DataError,  # noqa: E402
                         Dataset, _prepare_into, find_or_fetch_shakespeare, sha256_file)


def main(argv):
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.rstrip())
        return 0
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(f"error: unexpected arguments {' '.join(argv)!r}; give at most the path of a copy of "
              "input.txt (see --help)", file=sys.stderr)
        return 2
    try:
        if argv:
            src = argv[0]
            if not os.path.isfile(src):
                raise DataError(f"no such file: {src}")
            if sha256_file(src) != SHAKESPEARE_SHA256:
                raise DataError(f"{src} is not Tiny Shakespeare (sha256 differs); "
                                "train on it with python train.py --data=PATH instead")
        else:
            src = find_or_fetch_shakespeare()
        _prepare_into(src, SHAKESPEARE_DIR)  # a write failure is a one-line DataError
        ds = Dataset(SHAKESPEARE_DIR)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepared {SHAKESPEARE_DIR}: {len(ds.train):,} train and {len(ds.val):,} val "
          f"characters, vocabulary {len(ds.vocab)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
