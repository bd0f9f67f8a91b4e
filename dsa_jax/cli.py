"""`dsa-jax` command line: one subcommand per module in `dsa_jax/commands/`.

Each command module defines `HELP`, `add_arguments(parser)` and `main(args) -> int | None`. Config overrides
(`--config.train.steps=10` or `--config.train.steps 10`) are collected from the remaining arguments and handed to
the command as `args.overrides`.

Errors of bad input (the project's own error classes, and ValueError / OSError raised by its own code) print one
line and exit 2; anything else is a bug and keeps its traceback. DSA_JAX_DEBUG=1 shows every traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys

COMMANDS = ("info", "sample", "calibrate", "bench", "train", "convert", "data", "eval", "sweep")


def build_parser():
  parser = argparse.ArgumentParser(prog="dsa-jax", description="Autoregressive video diffusion with Dynamic Step "
                                   "Allocation (JAX/Flax).")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name in COMMANDS:
    if importlib.util.find_spec(f"dsa_jax.commands.{name}") is None:
      continue
    module = importlib.import_module(f"dsa_jax.commands.{name}")
    p = sub.add_parser(name, help=getattr(module, "HELP", None), description=module.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(_module=module)
  return parser


_NEGATIVE_WORD = re.compile(r"^-(inf|infinity|nan)$", re.IGNORECASE)


def split_overrides(argv) -> tuple[list[str], list[str]]:
  """(overrides as '--config.FIELD=VALUE', other arguments). Accepts `--config.FIELD VALUE` too, and lets an option
  take a value such as -inf (`--threshold -inf`), which argparse would read as an unknown option."""
  overrides, rest = [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config.") and "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
      overrides.append(f"{a}={argv[i + 1]}")
      i += 2
      continue
    if a.startswith("--config."):
      overrides.append(a)
    elif _NEGATIVE_WORD.match(a) and rest and rest[-1].startswith("--") and "=" not in rest[-1]:
      rest[-1] = f"{rest[-1]}={a}"
    else:
      rest.append(a)
    i += 1
  return overrides, rest


def options_given(args, add_arguments, dests=None) -> list[str]:
  """The options (argparse dests) among `dests`, default every option `add_arguments` defines, whose value in `args`
  differs from its default: what the user gave, so that a mode can refuse options it would otherwise drop."""
  parser = argparse.ArgumentParser(add_help=False)
  add_arguments(parser)
  if dests is None:
    dests = [a.dest for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)]  # pylint: disable=protected-access
  return [d for d in dests if getattr(args, d, parser.get_default(d)) != parser.get_default(d)]


def is_input_error(e: BaseException) -> bool:
  """The project's own error classes, and ValueError / OSError raised by a `raise` in dsa_jax code (its messages);
  the same types raised inside a library are bugs and keep their traceback."""
  if any(c.__module__.startswith("dsa_jax") for c in type(e).__mro__):
    return True
  if not isinstance(e, (ValueError, OSError)):
    return False
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  package = os.path.dirname(os.path.abspath(__file__))
  return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(package + os.sep)


def main(argv=None, *, exit_on_error: bool = False) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides, rest = split_overrides(argv)
  parser = build_parser()
  args = parser.parse_args(rest)
  args.overrides = overrides
  args._argv = argv  # the exact command line, for records such as the bench JSON
  try:
    return int(args._module.main(args) or 0)
  except Exception as e:  # pylint: disable=broad-except  (filtered: real bugs are re-raised)
    if os.environ.get("DSA_JAX_DEBUG") or not is_input_error(e):
      raise
    print(f"dsa-jax {args.command}: error: {e}", file=sys.stderr)
    if exit_on_error:
      # Leave at once: nothing useful is left to do, and orbax's background threads must not print more.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(2)
    return 2


def _drop_closed_loop_noise(default_hook):
  """An unraisable-exception hook without orbax's "Event loop is closed" (its background threads after a failed
  restore): that traceback is noise after the real error, printed from another thread at a random moment."""
  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
      return
    default_hook(unraisable)
  return hook


def console_main():
  """The `dsa-jax` executable (and `python -m dsa_jax`): a fresh process, so the project's default XLA flags
  (`dsa_jax/xla_flags.py`) are set before jax starts a backend."""
  from dsa_jax import xla_flags
  try:
    xla_flags.apply()
  except ValueError as e:  # a bad DSA_JAX_XLA_DEFAULTS
    print(f"dsa-jax: error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)
  sys.exit(main(exit_on_error=True))


if __name__ == "__main__":
  console_main()
