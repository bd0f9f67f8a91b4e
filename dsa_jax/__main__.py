import sys

from dsa_jax.cli import main

sys.exit(main())
