"""`dsa-jax` command line: one subcommand per module in `dsa_jax/commands/`.

Each command module defines `HELP`, `add_arguments(parser)` and `main(args) -> int | None`. Config overrides
(`--config.train.steps=10`) are collected from the remaining arguments and handed to the command as
`args.overrides`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMANDS = ("info", "sample", "bench", "train", "convert", "data", "eval", "sweep")


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


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  parser = build_parser()
  args = parser.parse_args(rest)
  args.overrides = overrides
  from dsa_jax.config_lib import ConfigError
  try:
    return int(args._module.main(args) or 0)
  except (ConfigError, FileNotFoundError, ValueError) as e:
    # Bad input: one clear line, no traceback (DSA_JAX_DEBUG=1 shows it).
    import os
    if os.environ.get("DSA_JAX_DEBUG"):
      raise
    print(f"dsa-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
