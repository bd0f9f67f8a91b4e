"""Benchmarks. `dsa-jax bench sample`: sampling speed (compile time, FPS, first-chunk latency, per-component split).

  dsa-jax bench sample --config configs/wan_1_3b.py --steps 4 --json out/bench.json
  dsa-jax bench sample --config configs/wan_1_3b.py --forced-mean-steps 2.5 --json out/bench_2p5.json
  dsa-jax bench sample --config configs/wan_1_3b.py --decode-only --json out/bench_vae.json
  dsa-jax bench sample --config configs/tiny.py --steps 2 --runs 2 --json /tmp/bench.json
  dsa-jax bench vae-convs --config configs/wan_1_3b.py --json out/vae_convs.json   # the VAE's conv lowerings
  dsa-jax bench attention --config configs/wan_1_3b.py --json out/attention.json  # the DiT's attention forms
  dsa-jax bench table docs/bench/*.json          # README's table from the JSON files
  dsa-jax bench train --config configs/wan_1_3b.py --teacher-like-model --steps 5 --json out/bench_train.json
"""

from __future__ import annotations

import argparse

HELP = "speed benchmarks (sample, vae-convs, attention, train) and their table"


def add_arguments(p):
  sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
  from dsa_jax.sampling import bench as bench_sample
  sp = sub.add_parser("sample", help="sampling speed: FPS, latency, compile time, component split",
                      description=bench_sample.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  bench_sample.add_arguments(sp)
  sp.set_defaults(_bench=bench_sample.main)
  from dsa_jax.sampling import bench_vae
  vp = sub.add_parser("vae-convs", help="the VAE decoder's convolution lowerings timed alone at its chunk shapes",
                      description=bench_vae.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  bench_vae.add_arguments(vp)
  vp.set_defaults(_bench=bench_vae.main)
  from dsa_jax.eval import bench_attention
  ap = sub.add_parser("attention", help="the DiT's self-attention timed alone in each form the model calls it",
                      description=bench_attention.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  bench_attention.add_arguments(ap)
  ap.set_defaults(_bench=bench_attention.main)
  tb = sub.add_parser("table", help="README's benchmark table (markdown) from bench sample JSON files")
  tb.add_argument("files", nargs="+", help="JSON files written by `dsa-jax bench sample --json`")
  tb.set_defaults(_bench=lambda args: print(bench_sample.markdown_table(args.files)) or 0)
  from dsa_jax.training import bench as bench_train
  tp = sub.add_parser("train", help="DSA training step: step time, peak memory, MFU",
                      description=bench_train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  bench_train.add_bench_train_arguments(tp)
  tp.set_defaults(_bench=lambda args: 0 if bench_train.run_bench_train(args) is not None else 1)


def main(args):
  return args._bench(args)
