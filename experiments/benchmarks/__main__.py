"""`python -m experiments.benchmarks <command> [options]`: every benchmark behind one command line.

  python -m experiments.benchmarks step --size tiny           # step throughput, FLOPs, memory
  python -m experiments.benchmarks ab --size vitb --variants base,remat_dots_all
  python -m experiments.benchmarks profile --size tiny --phase eval --calls 5
  python -m experiments.benchmarks loop --json                # trainer vs step, host pipeline
  python -m experiments.benchmarks seeds --ks 1,2,5           # stacked-seed step
  python -m experiments.benchmarks stacked-run speed --out /tmp/bs
  python -m experiments.benchmarks growth --tasks 10          # cost per task
  python -m experiments.benchmarks ntk --sweep-n 8,16,32      # NTK backends, probe size

`python -m experiments.benchmarks <command> --help` gives a command's options and what it
measures. Only the chosen command's module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module under experiments.benchmarks, one-line help)
COMMANDS = {
  "step": ("step", "throughput, FLOPs, memory and compile time of the jitted train/eval step"),
  "ab": ("ab", "variants of the step (switches, XLA options) side by side in one process"),
  "profile": ("profiling", "time of the jitted step per kind of XLA operation (jax.profiler)"),
  "loop": ("loop", "trainer vs the jitted step alone, host pipeline rate, feed threads"),
  "seeds": ("seeds", "images/s per seed of the stacked (vmapped) train step"),
  "stacked-run": ("stacked_run", "K seeds in one run vs K runs: wall time and equality"),
  "growth": ("growth", "wall time and memory per task as the task stream grows"),
  "ntk": ("ntk", "empirical-NTK backends, probe-size sweep, analysis overhead"),
}


def _chosen(argv: list[str]) -> str | None:
  """The command named in `argv` (its first word that is not an option), if any."""
  return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(
    prog="python -m experiments.benchmarks",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  commands = parser.add_subparsers(dest="command", required=True, metavar="command")
  chosen = _chosen(argv)
  for name, (module_name, help_line) in COMMANDS.items():
    if name != chosen:
      commands.add_parser(name, help=help_line)
      continue
    module = importlib.import_module(f"experiments.benchmarks.{module_name}")
    sub = commands.add_parser(
      name,
      help=help_line,
      description=module.__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(sub)
    sub.set_defaults(run=module.run, parser=sub)
  args = parser.parse_args(argv)
  # the command's own options only (some commands write `vars(args)` into their JSON)
  run, sub = args.run, args.parser
  del args.run, args.parser, args.command
  return run(args, sub) or 0


if __name__ == "__main__":
  sys.exit(main())
