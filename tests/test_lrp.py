"""Tests of LRP (jaxrepro.explain.lrp) and batch-norm merging (jaxrepro.explain.canonize).

Rules are checked against re-implementations written directly in matrix form (the way
zennit tests its rules): weights come from the layer's Jacobian, relevance at the layer's
output is the output itself (seed 1 in the gradient formulation).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_bitwise_equal

from jaxrepro.explain import lrp as L
from jaxrepro.explain.canonize import UnmergedBatchNorm
from jaxrepro.models import ConvNet, MiniXception


def _init(model, x, seed, **kwargs):
    """Variables of `model` drawn with numpy (scaled normal kernels, zero biases, unit
    BN statistics): the same tree as `model.init`, without compiling the initialisers."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, **kwargs))
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = jax.tree_util.keystr(path)
        if name.endswith(("['kernel']",)):
            fan_in = int(np.prod(spec.shape[:-1]))
            return jnp.asarray(rng.normal(size=spec.shape) / np.sqrt(fan_in), spec.dtype)
        if name.endswith(("['scale']", "['var']")):
            return jnp.ones(spec.shape, spec.dtype)
        return jnp.zeros(spec.shape, spec.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


# --- matrix-form references (float64 numpy; weight is [out, in], x is [N, in]) -------


def stab(z, eps=1e-6):
    return z + ((z == 0) + np.sign(z)) * eps


def ref_epsilon(w, b, x, r, epsilon=1e-6):
    z = x @ w.T + b
    return x * ((r / (stab(z, epsilon) if epsilon else z)) @ w)


def ref_gamma(w, b, x, r, gamma=0.25):
    out = x @ w.T + b
    xp, xn = np.maximum(x, 0), np.minimum(x, 0)
    wp, wn = w + gamma * np.maximum(w, 0), w + gamma * np.minimum(w, 0)
    bp, bn = b + gamma * np.maximum(b, 0), b + gamma * np.minimum(b, 0)
    gp = r / stab(xp @ wp.T + xn @ wn.T + bp) * (out > 0)
    gn = r / stab(xp @ wn.T + xn @ wp.T + bn) * (out < 0)
    return xp * (gp @ wp) + xn * (gp @ wn) + xp * (gn @ wn) + xn * (gn @ wp)


def ref_alphabeta(w, b, x, r, alpha, beta):
    xp, xn = np.maximum(x, 0), np.minimum(x, 0)
    wp, wn = np.maximum(w, 0), np.minimum(w, 0)
    ra = r / stab(xp @ wp.T + xn @ wn.T + np.maximum(b, 0))
    rb = r / stab(xp @ wn.T + xn @ wp.T + np.minimum(b, 0))
    return alpha * (xp * (ra @ wp) + xn * (ra @ wn)) - beta * (xp * (rb @ wn) + xn * (rb @ wp))


def ref_zbox(w, b, x, r, low, high):
    wp, wn = np.maximum(w, 0), np.minimum(w, 0)
    lo, hi = np.full_like(x, low), np.full_like(x, high)
    s = r / stab(x @ w.T - lo @ wp.T - hi @ wn.T)
    return x * (s @ w) - lo * (s @ wp) - hi * (s @ wn)


def ref_flat(wflat, x, r):
    return (r / stab(np.ones_like(x) @ wflat.T)) @ wflat


def ref_wsquare(w, b, x, r):
    return (r / stab(np.ones_like(x) @ (w**2).T + b**2)) @ (w**2)


# name -> (rule, reference(w, wflat, b, x, r), input_only)
RULE_CASES = {
    "lrp0": (L.LRP0(), lambda w, wf, b, x, r: ref_epsilon(w, b, x, r, 0.0), False),
    "epsilon": (L.Epsilon(1e-6), lambda w, wf, b, x, r: ref_epsilon(w, b, x, r), False),
    "epsilon-0.5": (L.Epsilon(0.5), lambda w, wf, b, x, r: ref_epsilon(w, b, x, r, 0.5), False),
    "gamma": (L.Gamma(0.25), lambda w, wf, b, x, r: ref_gamma(w, b, x, r), False),
    "gamma-1": (L.Gamma(1.0), lambda w, wf, b, x, r: ref_gamma(w, b, x, r, 1.0), False),
    "zplus": (L.ZPlus(), lambda w, wf, b, x, r: ref_alphabeta(w, b, x, r, 1.0, 0.0), False),
    "alpha2beta1": (
        L.AlphaBeta(2.0, 1.0),
        lambda w, wf, b, x, r: ref_alphabeta(w, b, x, r, 2.0, 1.0),
        False,
    ),
    "alpha1beta0": (
        L.AlphaBeta(1.0, 0.0),
        lambda w, wf, b, x, r: ref_alphabeta(w, b, x, r, 1.0, 0.0),
        False,
    ),
    "zb": (L.ZBox(-1.0, 2.0), lambda w, wf, b, x, r: ref_zbox(w, b, x, r, -1.0, 2.0), True),
    "flat": (L.Flat(), lambda w, wf, b, x, r: ref_flat(wf, x, r), True),
    "wsquare": (L.WSquare(), lambda w, wf, b, x, r: ref_wsquare(w, b, x, r), True),
}

# name -> (layer, input shape)
LAYERS = {
    "dense": (lambda **kw: nn.Dense(5, bias_init=nn.initializers.normal(0.5), **kw), (3, 7)),
    "conv": (
        lambda **kw: nn.Conv(
            4, (3, 3), strides=(2, 2), padding="SAME", bias_init=nn.initializers.normal(0.5), **kw
        ),
        (2, 5, 5, 3),
    ),
    "depthwise": (
        lambda **kw: nn.Conv(
            3, (3, 3), padding="VALID", feature_group_count=3, use_bias=False, **kw
        ),
        (2, 5, 5, 3),
    ),
}


def _matrix(layer, kernel, in_shape):
    """The layer (without bias) as a [out, in] matrix: its response to each basis input."""
    size = int(np.prod(in_shape[1:]))
    basis = jnp.eye(size).reshape(size, *in_shape[1:])
    cols = layer.clone(use_bias=False).apply({"params": {"kernel": kernel}}, basis)
    return np.asarray(cols, np.float64).reshape(size, -1).T


def _lrp(apply_fn, variables, x, composite):
    """`lrp` under jit: one compilation instead of one per primitive."""
    return jax.jit(lambda v, u: L.lrp(apply_fn, v, u, 1.0, composite=composite))(variables, x)


_BATCHES: dict = {}


def _lrp_batch(key, apply_fn, variables, x, composites):
    """{name: lrp(...)} for several composites in one jitted program, cached by `key`
    (the test cases of one layer share one compilation)."""
    if key not in _BATCHES:
        _BATCHES[key] = jax.jit(
            lambda v, u: {
                name: L.lrp(apply_fn, v, u, 1.0, composite=c) for name, c in composites.items()
            }
        )(variables, x)
    return _BATCHES[key]


def _layer_case(name, seed=0):
    make, shape = LAYERS[name]
    layer = make()
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)  # negative inputs exercise x-
    params = _init(layer, x, seed + 1)["params"]
    if "bias" in params:
        params = {
            **params,
            "bias": jnp.asarray(0.5 * rng.normal(size=params["bias"].shape), jnp.float32),
        }
    kernel = params["kernel"]
    w = _matrix(layer, kernel, shape)
    wflat = _matrix(layer, jnp.ones_like(kernel), shape)
    y = np.asarray(layer.apply({"params": params}, x), np.float64)
    b = np.asarray(y.reshape(shape[0], -1)[0], np.float64) - w @ np.asarray(
        x[0], np.float64
    ).reshape(-1)
    return layer, params, x, w, wflat, b, y


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
@pytest.mark.parametrize("rule_name", sorted(RULE_CASES))
def test_rule_matches_matrix_form_at_the_input_layer(rule_name, layer_name):
    rule, ref, _ = RULE_CASES[rule_name]
    layer, params, x, w, wflat, b, y = _layer_case(layer_name)
    if rule_name == "zb":  # inputs inside the bounds
        x = jnp.asarray(np.random.default_rng(3).uniform(-1.0, 2.0, x.shape), jnp.float32)
        y = np.asarray(layer.apply({"params": params}, x), np.float64)
    names = ("zb",) if rule_name == "zb" else tuple(k for k in RULE_CASES if k != "zb")
    out, rel = _lrp_batch(
        ("input", layer_name, names),
        layer.apply,
        {"params": params},
        x,
        {k: L.Composite((("input", RULE_CASES[k][0]),)) for k in names},
    )[rule_name]
    n = x.shape[0]
    xf = np.asarray(x, np.float64).reshape(n, -1)
    expected = ref(w, wflat, b, xf, y.reshape(n, -1)).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(out), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(rel), expected, rtol=2e-4, atol=2e-5 * np.abs(expected).max()
    )


class _Hidden(nn.Module):
    """A positive diagonal first layer (LRP-0 passes relevance through it unchanged),
    then the layer under test, so its rule runs on a hidden layer."""

    layer_name: str

    @nn.compact
    def __call__(self, x):
        diag = nn.Dense(x.shape[-1], use_bias=False, name="first")
        return LAYERS[self.layer_name][0](name="under_test")(diag(x))


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
@pytest.mark.parametrize("rule_name", sorted(k for k, v in RULE_CASES.items() if not v[2]))
def test_rule_matches_matrix_form_at_a_hidden_layer(rule_name, layer_name):
    rule, ref, _ = RULE_CASES[rule_name]
    layer, params, x, w, wflat, b, _ = _layer_case(layer_name)
    model = _Hidden(layer_name)
    first = jnp.diag(jnp.linspace(0.5, 2.0, x.shape[-1]))
    variables = {"params": {"first": {"kernel": first}, "under_test": params}}
    names = tuple(k for k, v in RULE_CASES.items() if not v[2])
    out, rel = _lrp_batch(
        ("hidden", layer_name),
        model.apply,
        variables,
        x,
        {k: L.Composite((("first", L.LRP0()), ("under_test", RULE_CASES[k][0]))) for k in names},
    )[rule_name]
    h = np.asarray(x * jnp.linspace(0.5, 2.0, x.shape[-1]), np.float64)  # first layer
    n = x.shape[0]
    expected = ref(w, wflat, b, h.reshape(n, -1), np.asarray(out, np.float64).reshape(n, -1))
    np.testing.assert_allclose(
        np.asarray(rel), expected.reshape(x.shape), rtol=2e-4, atol=2e-5 * np.abs(expected).max()
    )


# --- small networks ----------------------------------------------------------------


class _TinyNet(nn.Module):
    """A bias-free ReLU CNN with the models' operations: conv, depthwise, pointwise,
    max pooling, global average pooling and a dense head."""

    use_bias: bool = False

    @nn.compact
    def __call__(self, x, *, train=False):
        x = nn.relu(nn.Conv(6, (3, 3), use_bias=self.use_bias, name="conv1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(6, (3, 3), feature_group_count=6, use_bias=False, name="depthwise")(x)
        x = nn.relu(nn.Conv(8, (1, 1), use_bias=self.use_bias, name="conv2")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(1, use_bias=self.use_bias, name="dense")(x)[:, 0]


@functools.cache
def _tiny(use_bias=False):
    model = _TinyNet(use_bias)
    x = jnp.asarray(np.random.default_rng(7).uniform(size=(2, 10, 10, 3)), jnp.float32)
    variables = _init(model, x, 8)  # x in [0, 1], like the models' rescaled pixels
    if use_bias:
        variables = jax.tree.map(lambda a: a + 0.1, variables)
    return model, variables, x


@functools.cache
def _jitted_gradients(model):
    def gradients(variables, x):
        gv, gx = jax.grad(lambda v, u: jnp.sum(model.apply(v, u, train=False)), argnums=(0, 1))(
            variables, x
        )
        # Euler: logits are positively homogeneous in (inputs, biases, BN means), so
        # sum(logits) = sum(x * dx) + sum over bias-like leaves p of p * dp.
        share = sum(
            jnp.sum(p * g)
            for (path, p), g in zip(
                jax.tree_util.tree_leaves_with_path(variables), jax.tree.leaves(gv)
            )
            if jax.tree_util.keystr(path).endswith(("['bias']", "['mean']"))
        )
        return x * gx, share

    return jax.jit(gradients)


def _grad_x_input(model, variables, x):
    return _jitted_gradients(model)(variables, x)[0]


def _bias_share(model, variables, x):
    """Over the batch: sum over bias-like leaves p (biases, BN means) of p * dlogits/dp."""
    return _jitted_gradients(model)(variables, x)[1]


@functools.cache
def _jitted_attribute(model, composite):
    return jax.jit(lambda v, x, sign: L.attribute(model, v, x, sign=sign, composite=composite))


def _attribute(model, variables, images, composite="thesis", sign=1.0):
    """`attribute` under jit (one compilation per model and composite)."""
    sign = jnp.broadcast_to(jnp.asarray(sign, jnp.float32), images.shape[:1])
    return _jitted_attribute(model, composite)(variables, images, sign)


def _apply(model, variables, images):
    return jax.jit(functools.partial(model.apply, train=False))(variables, images)


@pytest.mark.parametrize("use_bias", [False, True])
def test_lrp0_equals_gradient_times_input(use_bias):
    model, variables, x = _tiny(use_bias)
    _, rel = _lrp(model.apply, variables, x, "lrp0")
    np.testing.assert_allclose(rel, _grad_x_input(model, variables, x), rtol=1e-5, atol=1e-7)


# z+ and alpha1-beta0 conserve where a layer has positive contributions (z+ > 0): true
# for convolutions followed by a ReLU on a bias-free net, not for a depthwise conv (its
# outputs feed the pointwise conv directly and may be negative), hence gamma there.
CONSERVING = [
    "lrp0",
    "epsilon",
    "epsilon-gamma-box",
    "input=flat,depthwise=gamma,conv=zplus,dense=epsilon",
    "depthwise=gamma,conv=alphabeta:1:0,dense=epsilon",
    "input=wsquare,conv=gamma:0.5,dense=epsilon",
]


CONTROLS = (
    "conv=alphabeta:2:1,dense=alphabeta:2:1",
    "conv=epsilon:10,dense=lrp0",
    "epsilon-plus-flat",
)


def _tiny_batch():
    model, variables, x = _tiny()
    return _lrp_batch("tiny", model.apply, variables, x, {c: c for c in (*CONSERVING, *CONTROLS)})


@pytest.mark.parametrize("composite", CONSERVING)
def test_conserving_rules_conserve_on_a_bias_free_net(composite):
    model, variables, x = _tiny()
    logits, rel = _tiny_batch()[composite]
    # the modified backward leaves the forward value alone
    np.testing.assert_allclose(logits, _apply(model, variables, x), rtol=1e-6, atol=1e-7)
    sums = rel.reshape(rel.shape[0], -1).sum(axis=1)
    np.testing.assert_allclose(sums, logits, rtol=1e-4, atol=1e-6)


def test_non_conserving_rules_do_not_conserve():
    """Controls for the test above: alpha2-beta1, a large epsilon, and z+ on the depthwise
    conv (zennit's epsilon-plus-flat) lose relevance."""
    model, variables, x = _tiny()
    for composite in CONTROLS:
        logits, rel = _tiny_batch()[composite]
        sums = rel.reshape(rel.shape[0], -1).sum(axis=1)
        assert np.all(np.abs(sums - logits) > 1e-3 * np.abs(logits)), composite


def test_biases_absorb_exactly_their_share_under_lrp0():
    """With biases, LRP-0 conserves sum(R) + sum_b b * df/db = f (Euler, ReLU nets)."""
    model, variables, x = _tiny(use_bias=True)
    logits, rel = _lrp(model.apply, variables, x, "lrp0")
    absorbed = _bias_share(model, variables, x)
    assert abs(float(absorbed)) > 1e-3  # the biases do take a share
    np.testing.assert_allclose(rel.sum() + absorbed, logits.sum(), rtol=1e-4, atol=1e-5)


def test_residual_add_splits_relevance_in_proportion_to_the_summands():
    class Residual(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = nn.Dense(1, use_bias=False, name="a")(x[:, :3])
            b = nn.Dense(1, use_bias=False, name="b")(x[:, 3:])
            return nn.Dense(1, use_bias=False, name="head")(a + b)[:, 0]

    model = Residual()
    x = jnp.array([[1.0, 2.0, -0.5, 0.3, -1.0, 2.5]])
    variables = {
        "params": {
            "a": {"kernel": jnp.array([[0.5], [1.0], [2.0]])},
            "b": {"kernel": jnp.array([[-1.0], [0.25], [0.5]])},
            "head": {"kernel": jnp.array([[1.5]])},
        }
    }
    logits, rel = L.lrp(model.apply, variables, x, 1.0, composite="epsilon")
    a, b = 0.5 + 2.0 - 1.0, -0.3 - 0.25 + 1.25  # the two summands
    assert np.isclose(float(logits[0]), 1.5 * (a + b))
    np.testing.assert_allclose(rel[0, :3].sum(), 1.5 * a, rtol=1e-5)
    np.testing.assert_allclose(rel[0, 3:].sum(), 1.5 * b, rtol=1e-5)


def test_max_pooling_gives_all_relevance_to_the_winner():
    class Pool(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            return nn.Dense(1, use_bias=False, name="head")(x.reshape(x.shape[0], -1))[:, 0]

    model = Pool()
    x = jnp.array([0.2, 0.9, 0.4, 0.1], jnp.float32).reshape(1, 2, 2, 1)
    variables = {"params": {"head": {"kernel": jnp.array([[2.0]])}}}
    _, rel = L.lrp(model.apply, variables, x, 1.0, composite="lrp0")
    np.testing.assert_allclose(rel.reshape(-1), [0.0, 1.8, 0.0, 0.0], rtol=1e-6)


# --- the paper's models ------------------------------------------------------------


def _perturbed_bn(variables, seed, with_bias=True):
    """Batch-norm statistics and affine parameters (and biases) away from their init."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = jax.tree_util.keystr(path)
        if name.endswith("['var']"):
            return jnp.asarray(rng.uniform(0.2, 3.0, a.shape), a.dtype)
        if name.endswith("['scale']") and "bn_" in name:
            return jnp.asarray(rng.uniform(-1.5, 2.0, a.shape), a.dtype)
        if with_bias and name.endswith("['mean']"):
            return jnp.asarray(0.5 * rng.normal(size=a.shape), a.dtype)
        if with_bias and name.endswith("['bias']"):
            return jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype)
        return a

    return jax.tree_util.tree_map_with_path(leaf, variables)


@functools.cache
def _model(name, small=True, with_bias=True):
    if name == "minixception":
        model = MiniXception(sizes=(8, 16, 16), stem_features=8) if small else MiniXception()
        size = 16 if small else 32
    else:
        model = ConvNet(filters=(4, 6, 8, 8, 8)) if small else ConvNet()
        size = 80
    images = jnp.asarray(np.random.default_rng(1).uniform(0, 255, (2, size, size, 3)), jnp.float32)
    variables = _init(model, images, 2, train=False)
    if name == "minixception":
        variables = _perturbed_bn(variables, 3, with_bias)
    if not with_bias:
        variables = jax.tree_util.tree_map_with_path(
            lambda p, a: (
                jnp.zeros_like(a)
                if jax.tree_util.keystr(p).endswith(("['bias']", "['mean']"))
                else a
            ),
            variables,
        )
    return model, variables, images


def test_minixception_batch_norms_are_found_from_the_call_order():
    """bn_b directly follows the pointwise conv and merges; block1's bn_a directly follows
    the stem (whose output also feeds the residual conv: that branch keeps the stem's own
    rule) and merges; the other bn_a follow a residual add, keep their own rule and are
    named in the warning."""
    model, variables, images = _model("minixception")
    plan = L.batchnorm_plan(model, variables, images)
    blocks = range(1, len(model.sizes) + 1)
    pointwise = tuple((f"block{i}/sepconv_a/pointwise", f"block{i}/bn_b") for i in blocks)
    assert plan.merged == (("stem", "block1/bn_a"), *pointwise)
    assert plan.unmerged == tuple(f"block{i}/bn_a" for i in blocks[1:])
    with pytest.warns(UnmergedBatchNorm, match="block2/bn_a"):
        jax.eval_shape(
            lambda v, x: L.attribute(model, v, x, composite="epsilon"), variables, images
        )


def test_convnet_has_no_batch_norm_to_merge():
    model, variables, images = _model("convnet")
    assert L.batchnorm_plan(model, variables, images) == L.BatchNormPlan((), ())


def test_merging_leaves_the_forward_value_and_the_variables_untouched():
    model, variables, images = _model("minixception")
    before = jax.tree.map(np.array, variables)
    logits = jax.jit(
        lambda v, x: L.lrp(lambda v, x: model.apply(v, x, train=False), v, x, composite="thesis")[0]
    )(variables, images)
    assert_bitwise_equal(variables, before)
    assert_bitwise_equal(logits, _apply(model, variables, images))


CONSERVING_MODEL = (
    "input=zb:0:1,conv[2-3]=gamma:0.25,block[1-2]=gamma:0.25,conv=epsilon:1e-9,dense=lrp0,bn=pass"
)


@pytest.mark.parametrize("name", ["minixception", "convnet"])
def test_thesis_structure_conserves_on_the_bias_free_models(name):
    """The thesis composite's rules with epsilon -> 0 and the identity rule for the
    unmerged batch norms conserve exactly when the models have no biases (BN means and
    betas zero, scales and variances perturbed)."""
    model, variables, images = _model(name, with_bias=False)
    logits = _apply(model, variables, images)
    rel = _attribute(model, variables, images, CONSERVING_MODEL)
    sums = rel.reshape(rel.shape[0], -1).sum(axis=1)
    np.testing.assert_allclose(sums, logits, rtol=1e-3, atol=1e-5)


def test_minixception_lrp0_conserves_up_to_the_bias_share():
    """With BN biases and means (merged and unmerged) and the dense bias: LRP-0 is
    gradient x input, and sum(R) = logit - sum_b b * dlogit/db."""
    model, variables, images = _model("minixception")
    logits = _apply(model, variables, images)
    rel = _attribute(model, variables, images, "lrp0")
    np.testing.assert_allclose(
        rel,
        _grad_x_input(model, variables, images),
        rtol=1e-3,
        atol=1e-4 * float(jnp.abs(rel).max()),
    )
    absorbed = _bias_share(model, variables, images)
    assert abs(float(absorbed)) > 1e-2 * float(jnp.abs(logits).sum())
    np.testing.assert_allclose(
        rel.sum() + absorbed, logits.sum(), rtol=1e-3, atol=1e-4 * float(jnp.abs(logits).max())
    )


@pytest.mark.parametrize("name, small", [("minixception", True), ("convnet", False)])
def test_thesis_composite_runs_on_the_models(name, small):
    model, variables, images = _model(name, small=small)
    rel = _attribute(model, variables, images, sign=jnp.array([1.0, -1.0]))
    assert rel.shape == images.shape and rel.dtype == jnp.float32
    assert np.all(np.isfinite(rel)) and float(jnp.abs(rel).max()) > 0
    hm = L.heatmap(rel)
    assert hm.shape == images.shape[:3]
    np.testing.assert_allclose(hm.sum(axis=(1, 2)), rel.sum(axis=(1, 2, 3)), rtol=1e-5)


def test_sign_flips_the_explanation():
    model, variables, images = _model("convnet", small=False)
    pos = _attribute(model, variables, images, sign=1.0)
    mixed = _attribute(model, variables, images, sign=jnp.array([1.0, -1.0]))
    np.testing.assert_array_equal(mixed[0], pos[0])
    np.testing.assert_allclose(mixed[1], -pos[1], rtol=1e-6)


def test_attribute_is_deterministic_under_jit():

    model, variables, images = _model("minixception")  # shares a compilation
    first = _attribute(model, variables, images, "thesis")
    again = _attribute(model, variables, images, "thesis")  # same executable, rerun
    # a separate trace and compilation of the same computation
    other = jax.jit(lambda v, x: L.attribute(model, v, x, composite="thesis"))(variables, images)
    assert_bitwise_equal(first, again)
    assert_bitwise_equal(first, other)
    assert float(jnp.abs(first).max()) > 0


# --- errors ------------------------------------------------------------------------


def test_alpha_beta_must_differ_by_one():
    with pytest.raises(ValueError, match="alpha - beta"):
        L.AlphaBeta(1.0, 1.0)
    with pytest.raises(ValueError, match="alpha - beta"):
        L.make_rule("alphabeta:3:1")
    assert L.AlphaBeta(2.0, 1.0).alpha == 2.0


def test_bad_composite_strings_name_the_valid_choices():
    with pytest.raises(ValueError, match=r"unknown LRP rule 'bogus'.*epsilon.*gamma.*zb"):
        L.parse_composite("input=zb,conv=bogus:1")
    with pytest.raises(ValueError, match="selector=rule"):
        L.parse_composite("conv")
    with pytest.raises(ValueError, match="at most 1"):
        L.parse_composite("conv=epsilon:1:2")
    with pytest.raises(ValueError, match="thesis"):
        L.get_composite("nonsense")
    parsed = L.parse_composite("input=zb:0:1, conv[2-3]=gamma:0.5 ,dense=lrp0")
    assert [s for s, _ in parsed.entries] == ["input", "conv[2-3]", "dense"]
    assert parsed.entries[1][1] == L.Gamma(0.5)


def test_input_only_rules_refuse_hidden_layers():
    model, variables, x = _tiny()
    with pytest.raises(ValueError, match="only to the input layer"):
        jax.eval_shape(
            lambda: L.lrp(model.apply, variables, x, 1.0, composite="conv=zb,dense=lrp0")
        )


def test_composite_selectors():
    comp = L.COMPOSITES["thesis"]

    def rule(path, tags, is_input=False):
        return comp.rule_for(L.LayerInfo(path, frozenset(tags), is_input))

    assert rule("stem", {"conv"}, True) == L.ZBox(0.0, 1.0)
    assert rule("conv2", {"conv"}) == L.Gamma(0.25)
    assert rule("conv4", {"conv"}) == L.Epsilon(0.25)
    assert rule("block2/sepconv_b/depthwise", {"conv", "depthwise"}) == L.Gamma(0.25)
    assert rule("block3/residual", {"conv", "pointwise"}) == L.Epsilon(0.25)
    assert rule("dense", {"dense"}) == L.LRP0()
    assert rule("block1/bn_a", {"bn"}) == L.Epsilon(0.25)  # 'block[1-2]' does not reach BN


def test_zabs_rule_matches_its_formula_on_an_unmerged_batch_norm():
    """Hui & Binder's |z| rule: R_x = |s x| / (|s x| + |t| + eps) R_y per channel, on a
    batch norm after a ReLU (so it cannot merge), LRP-0 elsewhere."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            z = nn.Dense(4, name="dense1")(x)
            y = nn.BatchNorm(use_running_average=True, name="bn")(nn.relu(z))
            return nn.Dense(1, use_bias=False, name="head")(y)[:, 0]

    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    model = Net()
    variables = jax.tree.map(
        lambda a: jnp.asarray(
            rng.uniform(0.3, 1.5, a.shape) * rng.choice([-1, 1], a.shape), a.dtype
        ),
        model.init(jax.random.key(0), x),
    )
    variables["batch_stats"]["bn"]["var"] = jnp.abs(variables["batch_stats"]["bn"]["var"])
    with pytest.warns(UnmergedBatchNorm):
        _, rel = L.lrp(model.apply, variables, x, composite="dense=lrp0,bn=zabs:0")
    p, st = variables["params"], variables["batch_stats"]["bn"]
    w1, b1 = np.asarray(p["dense1"]["kernel"], np.float64), np.asarray(p["dense1"]["bias"])
    z = np.asarray(x, np.float64) @ w1 + b1
    a = np.maximum(z, 0)
    s = np.asarray(p["bn"]["scale"]) / np.sqrt(np.asarray(st["var"], np.float64) + 1e-5)
    t = np.asarray(p["bn"]["bias"]) - np.asarray(st["mean"]) * s
    r_y = (a * s + t) * np.asarray(p["head"]["kernel"])[:, 0]  # LRP-0 of the head
    r_a = np.abs(s * a) / (np.abs(s * a) + np.abs(t)) * r_y
    r_z = r_a  # the ReLU passes relevance where it is active (r_a is 0 elsewhere)
    expected = np.asarray(x, np.float64) * ((r_z / np.where(z == 0, 1, z)) @ w1.T)
    np.testing.assert_allclose(rel, expected, rtol=1e-4, atol=1e-6)
    # and it is not the epsilon rule's share s a / y
    with pytest.warns(UnmergedBatchNorm):
        _, eps = L.lrp(model.apply, variables, x, composite="dense=lrp0,bn=epsilon:0")
    assert not np.allclose(eps, rel, rtol=1e-3)
