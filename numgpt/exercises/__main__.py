"""python -m numgpt.exercises init [DIR] [--force] | check [DIR] [--data FILE] [--steps N] ..."""
import os
import sys

from ..cli import OneLineParser
from ..gradcheck import stdout_closed_quietly
from . import FILES, ExerciseError, check, reference_backward_names, write_exercises


@stdout_closed_quietly
def main(argv=None):
    from .. import gradcheck
    from ..data import DataError
    ap = OneLineParser(prog="python -m numgpt.exercises",
                       description="Write numgpt's backward passes yourself and check them.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="init|check")
    ini = sub.add_parser("init", help="write a copy of numgpt/layers with the backward passes blank")
    ini.add_argument("folder", nargs="?", default="exercises")
    ini.add_argument("--force", action="store_true", help="overwrite exercises already there")
    chk = sub.add_parser("check", help="check your backward passes, then train on them")
    chk.add_argument("folder", nargs="?", default="exercises")
    chk.add_argument("--preset", action="extend", nargs="+", default=None, metavar="NAME",
                     help="check only these presets' whole models (default: all)")
    chk.add_argument("--data", default=None, help="a UTF-8 text to train on (default: Tiny Shakespeare)")
    chk.add_argument("--steps", type=int, default=300, help="training steps of each short run")
    chk.add_argument("--no-train", action="store_true", help="stop after the gradient checks")
    args = ap.parse_args(argv)
    try:
        if not args.folder:
            raise ExerciseError("the folder's name is empty; give one, e.g. exercises")
        if args.cmd == "init":
            write_exercises(args.folder, force=args.force)
            n = len(reference_backward_names())
            print(f"wrote {n} backward passes to write, in {len(FILES)} files, to {args.folder}/ "
                  f"(the order: {args.folder}/README.md)\n"
                  f"start with linear_backward in {args.folder}/linear.py, then run: "
                  f"python -m numgpt.exercises check {args.folder}")
            return 0
        if args.steps < 1:
            raise ExerciseError("--steps must be at least 1")
        for p in args.preset or []:
            if p not in gradcheck.presets():
                raise ExerciseError(f"unknown preset {p!r}; choose from "
                                    f"{', '.join(gradcheck.presets())}")
        if args.data is not None and not args.no_train:  # said now, not after the checks
            from ..cli import check_data_path
            from ..data import check_text_file
            check_data_path(args.data)
            check_text_file(os.path.abspath(args.data))
        ok = check(args.folder, presets=args.preset, data=args.data, steps=args.steps,
                   train=not args.no_train)
        return 0 if ok else 1
    except (ExerciseError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
