"""The optimizer follows Keras's RMSprop formula operation for operation."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import assert_bitwise_equal

from jaxrepro.train.optim import keras_rmsprop, make_optimizer


def keras_reference(w, grads, lr=1e-3, rho=0.9, eps=1e-7):
    """Keras 3 RMSprop.update_step written again in float32 numpy."""
    f = np.float32
    v = np.zeros_like(w)
    for g in grads:
        v = f(rho) * v + f(1 - rho) * np.square(g)
        w = w - (f(lr) * g) / np.sqrt(v + f(eps))
    return w, v


def _run(step, w0, grads):
    tx = keras_rmsprop()
    params, state = {"w": jnp.asarray(w0)}, tx.init({"w": jnp.asarray(w0)})
    for g in grads:
        params, state = step(tx, params, state, {"w": jnp.asarray(g)})
    return np.asarray(params["w"]), np.asarray(state.velocity["w"])


def _step(tx, p, s, g):
    u, s2 = tx.update(g, s, p)
    return optax.apply_updates(p, u), s2


def _inputs():
    k = jax.random.split(jax.random.key(3), 4)
    w0 = np.asarray(jax.random.normal(k[0], (500,)))
    return w0, [np.asarray(jax.random.normal(kk, (500,))) * 1e-2 for kk in k[1:]]


def test_matches_keras_formula_bitwise_op_by_op():
    # Without jit every operation is rounded on its own, as in Keras's update_step.
    w0, grads = _inputs()
    with jax.disable_jit():
        w, v = _run(_step, w0, grads)
    w_ref, v_ref = keras_reference(w0, grads)
    assert_bitwise_equal(v, v_ref)
    assert_bitwise_equal(w, w_ref)


def test_jit_matches_keras_formula_when_fma_is_off():
    # jaxrepro caps XLA:CPU at AVX on x86-64 (no FMA), so the jitted update rounds
    # every operation like Keras does. With FMA (other ISAs, or a user's own
    # --xla_cpu_max_isa) XLA contracts rho*v + (1-rho)*g**2 and the bits may move by an
    # ulp or two per step: still reproducible, checked with a bound instead.
    w0, grads = _inputs()
    step = jax.jit(_step, static_argnums=0)
    w1, v1 = _run(step, w0, grads)
    assert_bitwise_equal((w1, v1), _run(step, w0, grads))
    w_ref, v_ref = keras_reference(w0, grads)
    if "--xla_cpu_max_isa=AVX" in os.environ.get("XLA_FLAGS", "").split():
        assert_bitwise_equal((w1, v1), (w_ref, v_ref))
    else:
        ulps = np.abs(v1.view(np.int32).astype(np.int64) - v_ref.view(np.int32).astype(np.int64))
        assert ulps.max() <= 2 * len(grads)


def test_differs_from_optax_rmsprop_bits():
    # Documents why we do not use optax.rmsprop: same algorithm, other bits.
    g = {"w": jnp.linspace(-1, 1, 101)}
    ours = keras_rmsprop().update(g, keras_rmsprop().init(g))[0]["w"]
    theirs = optax.rmsprop(1e-3, decay=0.9, eps=1e-7).update(
        g, optax.rmsprop(1e-3, decay=0.9, eps=1e-7).init(g)
    )[0]["w"]
    assert not np.array_equal(np.asarray(ours), np.asarray(theirs))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_unknown_optimizer():
    try:
        make_optimizer("adamw")
    except ValueError as e:
        assert "rmsprop" in str(e)
    else:
        raise AssertionError("expected ValueError")
