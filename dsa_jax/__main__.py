from dsa_jax.cli import console_main

console_main()
