"""The benchmarks: one command line, `python -m experiments.benchmarks <command> ...`.

One module per command (`COMMANDS` in `__main__.py`), each with `add_arguments(parser)` and
`run(args, parser) -> exit status`; `harness.py` is the one place for timing, memory fields,
worker processes and JSON output; `stepcase.py` builds and times one case of the jitted step
(shared by `step`, `ab` and `profile`), `step_tables.py` prints the `step` tables. Importing this
package imports nothing else (the PyTorch workers of `--vs-official` run through `harness`).
"""
