"""Throughput of 1 vs N devices, plain and device-count invariant, side by side.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        uv run --frozen python benchmarks/parallel_bench.py [CONFIG_FILE] [--size 96]

Runs every variant in this one process (so all share one thread pool) on random
uint8 batches: the single-device program, the plain sharded step on 2/4/8 devices
and the invariant step (M micro-batches) on 1/2/4/8 devices. Prints seconds per step,
images per second, and the memory and traffic the invariant combination costs per
device (computed from the parameter count). Simulated CPU devices share the
machine's cores: the figures show overheads, not the speed-up of real devices.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxrepro import config as configlib
from jaxrepro import train
from jaxrepro.train import parallel


def time_variant(
    model, tx, config, num_devices: int, microbatches: int, batches, keys, steps: int
) -> tuple[float, float]:
    """(compile + first step seconds, mean seconds per later step) of one variant."""
    mesh = None
    if num_devices > 1 or microbatches:
        mesh = parallel.make_mesh(num_devices)
    step_fn = parallel.make_step(model, tx, config.augment, mesh, microbatches, config.batch_size)
    state = train.init_state(model, tx, keys["init"], config.data.image_size)
    k = keys
    if mesh is not None:
        state, k = (
            parallel.put(state, parallel.replicated(mesh)),
            parallel.put(keys, parallel.replicated(mesh)),
        )

    def run(i, state):
        images, labels = batches[i % len(batches)]
        if mesh is not None:
            images, labels = parallel.put((images, labels), parallel.batch_sharded(mesh))
        state, metrics, _ = step_fn(state, images, labels, k)
        jax.block_until_ready(metrics)
        return state

    t0 = time.perf_counter()
    state = run(0, state)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        state = run(i, state)
    return first, (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "config_file",
        nargs="?",
        default="experiments/convnet.py",
        help="experiment config (default: %(default)s)",
    )
    parser.add_argument("--size", type=int, default=96, help="image size (convnet: >= 78)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    args = parser.parse_args()
    config = configlib.resolve(
        args.config_file, [f"data.image_size={args.size}", f"batch_size={args.batch}"]
    )
    model, tx = train.build_model(config), train.build_optimizer(config)
    keys = train.stream_keys(config)
    r = np.random.RandomState(0)
    batches = [
        (
            r.randint(0, 256, (args.batch, args.size, args.size, 3)).astype(np.uint8),
            r.randint(0, 2, args.batch).astype(np.int32),
        )
        for _ in range(2)
    ]
    params = train.init_state(model, tx, keys["init"], args.size).params
    pbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    m = args.microbatches
    print(
        f"{config.model} {args.size}px batch {args.batch}, {jax.device_count()} CPU devices "
        "on this host; "
        f"params {pbytes / 2**20:.2f} MiB"
    )
    print(
        f"{'variant':<22}{'devices':>8}{'compile+1st s':>15}{'s/step':>9}{'img/s':>8}"
        f"{'grad mem/dev MiB':>18}{'recv/dev/step MiB':>19}"
    )
    variants = [(1, 0), (2, 0), (4, 0), (8, 0), (1, m), (2, m), (4, m), (8, m)]
    for d, mb in variants:
        if d > jax.device_count():
            continue
        first, per = time_variant(model, tx, config, d, mb, batches, keys, args.steps)
        if mb:
            name = f"invariant M={mb}"
            mem = (mb // d + mb) * pbytes  # own slots + all M gathered gradients
            recv = (mb - mb // d) * pbytes  # all_gather of the other devices' slots
        else:
            name = "single program" if d == 1 else "plain sharded"
            mem = pbytes
            recv = 2 * (d - 1) / d * pbytes  # a ring all-reduce of one gradient
        print(
            f"{name:<22}{d:>8}{first:>15.1f}{per:>9.2f}{args.batch / per:>8.1f}"
            f"{mem / 2**20:>18.2f}{recv / 2**20:>19.2f}"
        )


if __name__ == "__main__":
    main()
