"""Child of test_portable: one compiled train step per config, called 40 times.

    python tests/repeat_step.py MODE CONFIG_FILE...

Prints a JSON object: per experiment, the mode and the distinct SHA-256s of the
step's outputs over 20 sequential calls and 2 x 10 calls from two threads at once (two
executions of one executable in flight, which is what would expose a racy reduction;
jax issue 39741). The inputs are the same on every call.
"""

import json
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxrepro import config as configlib
from jaxrepro import determinism, fingerprint, train
from jaxrepro.train import steps


def distinct_outputs(spec: str, mode: str) -> dict:
    c = configlib.resolve(spec, [f"determinism={mode}"])
    determinism.apply_config(c)
    model, tx = train.build_model(c), train.build_optimizer(c)
    keys = train.stream_keys(c)
    state = train.init_state(model, tx, keys["init"], c.data.image_size)
    step = steps.make_train_step(model, tx, steps.augmentation(c))
    shape = (c.batch_size, c.data.image_size, c.data.image_size, 3)
    x = np.asarray(jax.random.randint(jax.random.key(3), shape, 0, 256), np.uint8)
    y = np.arange(c.batch_size, dtype=np.int32) % 2

    def sha() -> str:  # the training's own step, which donates its state: a fresh copy
        new, metrics, _ = step(jax.tree.map(jnp.copy, state), x, y, keys)
        return fingerprint.combine_hex(fingerprint.sha256_leaves((new.variables, metrics)))

    calls = [sha() for _ in range(20)]
    threads = [
        threading.Thread(target=lambda: calls.extend(sha() for _ in range(10))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"mode": determinism.mode(), "calls": len(calls), "distinct": sorted(set(calls))}


if __name__ == "__main__":
    mode, specs = sys.argv[1], sys.argv[2:]
    out = {}
    for spec in specs:
        result = distinct_outputs(spec, mode)
        out[configlib.resolve(spec, []).experiment] = result
    print(json.dumps(out))
