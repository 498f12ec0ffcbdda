"""Command line: ``python -m fastbptt [profile|bench|bench-torch|train|predict|warmup] ...``.

With no subcommand it runs ``profile``: fastbptt against the NumPy reference over a
small grid of T and H. ``python -m fastbptt SUBCOMMAND --help`` tells each one's flags.
"""

import importlib
import sys

SUBCOMMANDS = {
    "profile": ("fastbptt.benchmarking.profile", "time one training step against the NumPy reference"),
    "bench": ("fastbptt.benchmarking.benchmark", "the benchmark grid, side by side with PyTorch and JAX"),
    "bench-torch": ("fastbptt.benchmarking.torch_step", "a PyTorch training step: fastbptt.torch against torch.nn"),
    "train": ("fastbptt.training.charrnn", "train a character-level RNN, GRU or LSTM language model"),
    "predict": ("fastbptt.training.predict", "generate text with a model saved by train --save"),
    "warmup": ("fastbptt.training.warmup", "compile every kernel into Numba's on-disk cache ahead of time"),
}


HELP = """\
usage: python -m fastbptt [SUBCOMMAND] [FLAGS]

fastbptt: fast backpropagation through time for recurrent networks on the CPU.
With no subcommand it runs profile. 'python -m fastbptt SUBCOMMAND --help' lists
a subcommand's flags.

subcommands:"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(HELP)                          # plain text: the module docstring is reST
        for name, (_, text) in SUBCOMMANDS.items():
            print(f"  {name:<11} {text}")
        return 0
    name = argv[0] if argv and not argv[0].startswith("-") else "profile"
    if argv and argv[0] == name:
        argv = argv[1:]
    if name not in SUBCOMMANDS:
        print(f"python -m fastbptt: unknown subcommand {name!r}; choose from {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(main())
