"""Exercises: write every backward pass of numgpt yourself, then check it the way the real ones are.

    python -m numgpt.exercises init [DIR] [--force]    # DIR (default ./exercises): your copy
    python -m numgpt.exercises check [DIR]             # layer by layer, the model, two short runs

`init` copies numgpt/layers/*.py into DIR with the body of every *_backward function replaced by
`raise NotImplementedError(...)` naming the section of docs/derivations.md that derives it. The
copy is made from the real layers each time (found with `ast`), so it never drifts from them; the
forward functions, the docstrings and the caches stay as they are.

`check` imports DIR as a package, swaps its backward functions into numgpt everywhere (the swap
of numgpt/bugs.py, which plants the catalogue's bugs), and runs the gradient-check report of
numgpt.gradcheck on every layer in the order a learner writes them, printing a hint under each
failing layer. When every layer passes it checks the whole model of every preset, and then
trains the bigram and single_head rungs for a few hundred steps on the learner's code (NumPy
layers) and on the reference, side by side.
"""
import ast
import importlib.util
import itertools
import os
import re
import sys

import numpy as np

from .. import gradcheck
from ..bugs import swap

LAYERS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "layers")

# the files of numgpt/layers in the order the exercises are best done in
FILES = ["linear", "activations", "layernorm", "dropout", "embedding", "loss", "residual",
         "attention", "feedforward"]

# for each layer of the report, the backward functions its check runs (its own first)
USES = {
    "linear": ["linear_backward"], "relu": ["relu_backward"], "gelu": ["gelu_backward"],
    "layernorm": ["layernorm_backward"], "dropout": ["dropout_backward"],
    "embedding": ["embedding_backward"], "position": ["position_backward"],
    "cross_entropy": ["cross_entropy_backward"],
    "residual": ["residual_backward", "linear_backward"],
    "attention": ["attention_backward", "dropout_backward"],
    "multihead": ["multihead_backward", "attention_backward", "linear_backward",
                  "dropout_backward"],
    "feedforward": ["feedforward_backward", "linear_backward", "gelu_backward",
                    "dropout_backward"],
}

# per layer: the typical mistake, said as what to look at
HINTS = {
    "linear": "dW = x^T dy needs x and dy flattened to [N, C] first; db sums dy over every "
              "leading axis, not only the first",
    "relu": "dx = dy * 1[x > 0], with the mask the forward pass cached",
    "gelu": "y = 0.5 x (1 + t) is a product: 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2)",
    "layernorm": "three paths reach x: direct, through the mean, through the variance; the "
                 "variance term - xhat * mean(dxhat * xhat) is the one most often missing",
    "dropout": "the survivors were scaled by 1/(1-p); the cache already holds mask/(1-p)",
    "embedding": "ids repeat: dW[idx] += dout keeps one contribution per id; np.add.at adds all",
    "position": "sum dout over the batch into dP[:T]; dP has the table's shape, zero past T",
    "cross_entropy": "(softmax - onehot) / N, times dloss",
    "residual": "both branches receive dy unchanged: return (dy, dy)",
    "attention": "the softmax backward needs its row-sum term and the probabilities before "
                 "dropout (p, not pd); dq and dk carry the scale 1/sqrt(hs)",
    "multihead": "x fed q, k and v, so dx is the sum of three; split_heads and merge_heads are "
                 "each other's backward",
    "feedforward": "undo the forward in reverse: dropout, w_out, the activation, w_fc",
}

ANCHOR = re.compile(r"docs/derivations\.md#([\w-]+)")
HEADER = ("# numgpt exercise, generated from numgpt/layers/{name}.py by python -m numgpt.exercises"
          " init.\n# Write the body of every *_backward function below, then run:"
          " python -m numgpt.exercises check {folder}\n")


class ExerciseError(Exception):
    """A problem with the exercise folder or the command; the message is one line for the user."""


def backward_functions(source):
    """[(name, first body line, last line, indent, docs anchor)] of the module-level *_backward
    functions of a layer file's source; lines are 1-based and span the body after the docstring."""
    tree = ast.parse(source)
    mod_doc = ast.get_docstring(tree) or ""
    m = ANCHOR.search(mod_doc)
    mod_anchor = m.group(1) if m else ""
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_backward"):
            doc = ast.get_docstring(node)
            body = node.body[1:] if doc is not None else node.body
            m = ANCHOR.search(doc or "")
            out.append((node.name, body[0].lineno, node.end_lineno, body[0].col_offset,
                        m.group(1) if m else mod_anchor))
    return out


def blank_source(source, blank=None):
    """source with the bodies of its *_backward functions (those named in blank; all when None)
    replaced by a NotImplementedError that names the derivation to read."""
    lines = source.splitlines(keepends=True)
    for name, start, end, indent, anchor in reversed(backward_functions(source)):
        if blank is not None and name not in blank:
            continue
        lines[start - 1:end] = [" " * indent + f'raise NotImplementedError("derive {name}: '
                                f'see docs/derivations.md#{anchor}")\n']
    return "".join(lines)


def reference_backward_names():
    """Every *_backward function of numgpt/layers, in the order of FILES."""
    names = []
    for f in FILES:
        with open(os.path.join(LAYERS_DIR, f + ".py"), encoding="utf-8") as fh:
            names += [n for n, *_ in backward_functions(fh.read())]
    return names


def write_exercises(folder, force=False, blank=None):
    """Write the learner's copy of numgpt/layers into folder; returns the files written.

    blank: the backward functions to leave blank (all when None; () writes the reference).
    Refuses (ExerciseError) when folder already holds any of the files, unless force.
    """
    files = ["__init__.py"] + [f + ".py" for f in FILES]
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ExerciseError(f"{folder} exists and is not a folder")
    present = [f for f in files if os.path.exists(os.path.join(folder, f))]
    if present and not force:
        raise ExerciseError(f"{folder} already holds exercises ({', '.join(present[:3])}"
                            f"{', ...' if len(present) > 3 else ''}); your work is kept: pass "
                            "--force to overwrite it, or name another folder")
    try:
        os.makedirs(folder, exist_ok=True)
        written = []
        for f in files:
            with open(os.path.join(LAYERS_DIR, f), encoding="utf-8") as fh:
                src = fh.read()
            if f != "__init__.py":
                src = HEADER.format(name=f[:-3], folder=folder) + blank_source(src, blank)
            path = os.path.join(folder, f)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(src)
            written.append(path)
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(readme(folder))
    except OSError as e:
        raise ExerciseError(f"cannot write the exercises to {folder} ({e.strerror})") from None
    return written


def readme(folder):
    """The folder's README: the order of the exercises and the three steps of each."""
    rows = []
    for layer, uses in USES.items():
        with open(os.path.join(LAYERS_DIR, _file_of(uses[0]) + ".py"), encoding="utf-8") as fh:
            anchor = {n: a for n, *_, a in backward_functions(fh.read())}[uses[0]]
        rows.append(f"{len(rows) + 1}. `{uses[0]}` in {_file_of(uses[0])}.py: "
                    f"docs/derivations.md#{anchor}")
    return ("# numgpt exercises\n\nFor each function, in this order: read the derivation, write "
            "the body, then check it:\n\n    python -m numgpt.exercises check " + folder + "\n\n"
            + "\n".join(rows) + "\n")


def _file_of(func):
    for f in FILES:
        with open(os.path.join(LAYERS_DIR, f + ".py"), encoding="utf-8") as fh:
            if func in [n for n, *_ in backward_functions(fh.read())]:
                return f
    raise KeyError(func)


_loads = itertools.count()


def load_learner(folder):
    """Import folder as a package (a fresh one each call); returns name -> the learner's
    function for every *_backward function of numgpt/layers. ExerciseError (one line) when the
    folder, a file or a function is missing, or the code cannot be imported."""
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        raise ExerciseError(f"{folder} holds no exercises; make them with: "
                            f"python -m numgpt.exercises init {folder}")
    name = f"_numgpt_learner_{next(_loads)}"
    spec = importlib.util.spec_from_file_location(name, init,
                                                  submodule_search_locations=[folder])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    try:
        spec.loader.exec_module(pkg)
    except SyntaxError as e:
        raise ExerciseError(f"{e.filename}:{e.lineno}: {e.msg}") from None
    except Exception as e:
        raise ExerciseError(f"importing the exercises in {folder} failed: "
                            f"{type(e).__name__}: {e}") from None
    finally:
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]
    funcs = {}
    for f in reference_backward_names():
        fn = getattr(pkg, f, None)
        if not callable(fn):
            raise ExerciseError(f"the exercises in {folder} have no function {f} (is it still "
                                "imported in __init__.py?)")
        funcs[f] = fn
    return funcs


def make_hint():
    """hint(layer, rows) for gradcheck.run_report: what to read when a layer fails, or which
    failing function it uses (the layers run in order, so those failed above)."""
    failed = set()

    def hint(layer, rows):
        if layer not in USES:
            return "the layers pass but the model does not: see docs/derivations.md#the-whole-model"
        own = USES[layer][0]
        failed.add(own)
        with open(os.path.join(LAYERS_DIR, _file_of(own) + ".py"), encoding="utf-8") as fh:
            anchor = {n: a for n, *_, a in backward_functions(fh.read())}[own]
        text = f"read docs/derivations.md#{anchor}; {HINTS[layer]}"
        below = [f for f in USES[layer][1:] if f in failed]
        if below:
            text += (f"; the check also runs {', '.join(below)}, which "
                     f"{'fails' if len(below) == 1 else 'fail'} above: fix "
                     f"{'it' if len(below) == 1 else 'them'} first")
        return text
    return hint


def short_run(preset, ds, steps, seed=0, eval_batches=20):
    """Validation loss of `preset` after `steps` AdamW steps on ds (float32, NumPy layers)."""
    from .. import get_config
    from ..model import GPT
    from ..optim import AdamW
    cfg = get_config(preset, vocab_size=len(ds.vocab), kernels=False)
    ds.check_block(cfg.block_size)
    model = GPT(cfg, seed=seed, dtype=np.float32)
    opt = AdamW(model.params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                weight_decay=cfg.weight_decay, use_kernels=False)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x, y = ds.get_batch("train", cfg.batch_size, cfg.block_size, rng)
        _, grads = model.loss_and_grads(x, y, rng=rng)
        opt.step(grads)
    erng = np.random.default_rng(seed + 1)
    return float(np.mean([model.loss(*ds.get_batch("val", cfg.batch_size, cfg.block_size, erng))
                          for _ in range(eval_batches)]))


TRAIN_PRESETS = ["bigram", "single_head"]
TRAIN_TOL = 0.01  # the learner's val loss may differ from the reference's by float32 round-off


def check(folder, presets=None, data=None, steps=300, train=True, out=sys.stdout):
    """Check the learner's exercises in folder; True when every check passes.

    Raises ExerciseError for a folder that cannot be used, and DataError (numgpt.data) when the
    training text cannot be read.
    """
    funcs = load_learner(folder)
    print(f"checking the backward passes in {folder} (float64, central differences)\n", file=out)
    with swap(funcs):
        rows = gradcheck.run_report(layers=list(gradcheck.LAYERS), out=out, hint=make_hint())
    if not all(r.passed for r in rows):
        bad = [n for n in gradcheck.LAYERS if not all(r.passed for r in rows if r.name == n)]
        print(f"\n{len(bad)} of {len(gradcheck.LAYERS)} layers to go: {', '.join(bad)}. "
              "The whole model is checked when every layer passes.", file=out)
        return False
    print("\nevery layer passes; now the whole model of every preset, on your code\n", file=out)
    with swap(funcs):
        rows = gradcheck.run_report(presets_=presets or gradcheck.presets(), out=out,
                                    hint=make_hint())
    if not all(r.passed for r in rows):
        print("\nthe whole model fails with layers that pass on their own: see "
              "docs/derivations.md#the-whole-model", file=out)
        return False
    if not train:
        print("\nevery check passes", file=out)
        return True
    from ..data import load_dataset
    ds = load_dataset(data)
    print(f"\ntraining on your code and on the reference ({steps} steps each, NumPy layers)\n",
          file=out)
    ok = True
    for preset in TRAIN_PRESETS:
        with swap(funcs):
            mine = short_run(preset, ds, steps)
        ref = short_run(preset, ds, steps)
        same = abs(mine - ref) <= TRAIN_TOL
        ok &= same
        print(f"  {preset:<12} val loss {mine:.4f}   reference {ref:.4f}   "
              f"{'same' if same else 'DIFFERENT'}", file=out)
    print("\n" + ("every check passes: these are your backward passes training a GPT" if ok else
                  "the runs differ although the checks pass"), file=out)
    return ok
