"""Layer-wise relevance propagation (LRP) as `jax.grad` through a modified forward pass.

How it works. The real Flax model runs under `flax.linen.intercept_methods`; every
`nn.Conv` (plain, depthwise via `feature_group_count`, pointwise) and `nn.Dense` call,
and every batch norm that was not merged into the layer before it (see
`jaxrepro.explain.canonize`), is replaced by

    out = stop_gradient(z) + sum_g (z_g - stop_gradient(z_g)) * stop_gradient(c_g)

where `z` is the layer's real output (so the forward value is unchanged), `z_g` are
rule-modified forward passes (modified inputs, weights and biases) and
`c_g = scale_g * mask_g * y / stabilize(z_g)` with `y` the layer's output including
its bias. The gradient flowing backwards is then `c = R / a` (relevance divided by
activation), so the relevance of any activation is `a * grad`; everything that is not
intercepted keeps its ordinary gradient, which gives the LRP treatment of:

* ReLU: relevance passes where the unit is active;
* max pooling: winner takes all (the gradient routes to the maximum);
* global average pooling: LRP-0 of a linear map (each input gets `x / sum(x)` of it);
* residual adds: `R_a = a * c`, `R_b = b * c`, a split in proportion to the summands;
* dropout: off (`train=False`); the models' 1/255 rescaling: relevance unchanged.

Relevance at the input. Relevance is `d(cotangent . output) / du` for a probe `u = 1`
that multiplies the inputs: gradient x input. The first layer the model calls is the
*input layer* if it sees an input-shaped tensor (the paper's models: the rescaled
image). There the modified inputs are multiplied by `u` directly and the layer's input
is cut from the gradient, so rules whose relevance is not proportional to the input
(z^B's bound terms, flat, w^2) work; those rules are allowed only at the input layer.

Rules (`RULES`; matrix forms as in zennit, `stabilize` adds `eps * sign(z)`):
``lrp0``, ``epsilon[:eps]``, ``gamma[:gamma]`` (zennit's generalised gamma, also for
negative inputs), ``zplus``, ``alphabeta[:alpha:beta]`` (alpha - beta = 1 enforced),
``zb[:low:high]`` (input only, default bounds 0 and 1 for the rescaled pixels),
``flat`` and ``wsquare`` (input only), ``pass`` and ``zabs[:eps]`` (batch norm only: the
identity rule and the |z| rule of Hui & Binder 2019).

Any Flax Linen model works, with nothing registered: layers are recognised by their
Flax classes (`nn.Conv`, `nn.Dense`, `nn.BatchNorm`) as the model calls them.

Batch norm (Heggen's thesis, section 3.4.2). Batch norms that directly follow a conv or
dense layer are merged into it (`jaxrepro.explain.canonize`: pairs found from the traced
call order, merged in the parameters' dtype), the treatment the thesis recommends.
The rest (the mini Xception's ``bn_a`` after a residual add) are per-channel affine
maps ``y = s * x + t``, named in an `UnmergedBatchNorm` warning, and get a rule like a
diagonal linear layer; composites pick it with the ``bn`` selector. The built-in
composites use ``epsilon``: the thesis lists the
identity and epsilon rules as the original recommendations, notes that the identity rule
ignores the bias, and the epsilon rule treats ``t`` exactly as a merged conv bias is
treated (its share ``t / y`` of the relevance is absorbed, like every bias), without
dividing by the batch norm's input. ``bn=pass`` gives the identity rule (relevance passes
unchanged, conserving) for users who want it, ``bn=zabs`` the |z| rule of the thesis's
reference [28] (Hui & Binder 2019; see `ZAbs` for the variant).

Composites map layers to rules; see `parse_composite` for the string syntax and
`COMPOSITES` for the named ones.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxrepro.explain import canonize, heads

__all__ = [
    "AlphaBeta",
    "BatchNormPlan",
    "COMPOSITES",
    "Composite",
    "Epsilon",
    "Flat",
    "Gamma",
    "LRP0",
    "Pass",
    "RULES",
    "Rule",
    "WSquare",
    "ZBox",
    "ZPlus",
    "ZAbs",
    "attribute",
    "batchnorm_plan",
    "get_composite",
    "heatmap",
    "lrp",
    "make_rule",
    "parse_composite",
    "stabilize",
]

Array = jax.Array

DEFAULT_STABILIZER = 1e-6


def stabilize(z: Array, epsilon: float) -> Array:
    """`z + eps * sign(z)` (and `+eps` where z == 0): a denominator that is never 0."""
    return z + ((z == 0).astype(z.dtype) + jnp.sign(z)) * jnp.asarray(epsilon, z.dtype)


# --- rules as (groups of) modified forward terms -------------------------------------


def _same(w: Array) -> Array:
    return w


def _pos(w: Array) -> Array:
    return jnp.maximum(w, 0)


def _neg(w: Array) -> Array:
    return jnp.minimum(w, 0)


@dataclasses.dataclass(frozen=True)
class _Term:
    """One modified forward pass: linear(input_mod(x), weight_mod(W)) + bias_mod(b)."""

    inputs: str  # 'x', 'pos', 'neg' (x+, x-), 'const' (`value`, e.g. a z^B bound)
    weight: Callable[[Array], Array]
    bias: Callable[[Array], Array] | None  # None: no bias in this term
    sign: float = 1.0
    value: float = 1.0  # the constant input of a 'const' term


@dataclasses.dataclass(frozen=True)
class _Group:
    """Terms sharing one denominator z_g; relevance share scale * mask(y) * R / z_g."""

    terms: tuple[_Term, ...]
    scale: float = 1.0
    where: str = "all"  # 'all', 'pos' (y > 0), 'neg' (y < 0)
    stabilizer: float | None = DEFAULT_STABILIZER  # None: c_g = scale (z_g equals y)


@dataclasses.dataclass(frozen=True)
class _Layer:
    """What a rule sees of one intercepted layer."""

    path: str
    x: Array  # layer input
    z: Array  # real output of the module call
    y: Array  # output including a merged bias (the pre-activation relevance refers to)
    kernel: Array
    bias: Array | None
    linear: Callable[[Array, Array], Array]  # (input, kernel) -> output without bias
    probe: Array | None  # the input-layer probe u, None for hidden layers


def _term_input(layer: _Layer, term: _Term) -> Array:
    """The term's input; at the input layer times the probe, the only path to it."""
    x = layer.x if layer.probe is None else lax.stop_gradient(layer.x)
    if term.inputs == "x":
        m = x
    elif term.inputs == "pos":
        m = jax.nn.relu(x)
    elif term.inputs == "neg":
        m = -jax.nn.relu(-x)
    elif term.inputs == "const" and layer.probe is not None:
        m = jnp.full_like(x, term.value)
    else:  # input-only rules are rejected for hidden layers before this
        raise AssertionError(f"{term.inputs} input at hidden layer {layer.path}")
    return m if layer.probe is None else m * layer.probe


class Rule:
    """An LRP rule for linear layers: a tuple of groups of modified forward terms."""

    name: str = "rule"
    input_only: bool = False  # relevance not proportional to the input
    linear: bool = True  # may be used for conv / dense layers

    def groups(self, layer: _Layer) -> tuple[_Group, ...]:
        raise NotImplementedError

    def propagate(self, layer: _Layer) -> Array:
        """The layer's output with this rule's backward pass (forward value unchanged)."""
        out = lax.stop_gradient(layer.z)
        for group in self.groups(layer):
            zg = None
            for term in group.terms:
                zt = layer.linear(_term_input(layer, term), term.weight(layer.kernel))
                if term.bias is not None and layer.bias is not None:
                    zt = zt + term.bias(layer.bias)
                zt = zt if term.sign == 1.0 else term.sign * zt
                zg = zt if zg is None else zg + zt
            if group.stabilizer is None:
                coef = jnp.full_like(layer.y, group.scale)
            else:  # a zero denominator (epsilon=0, z_g=0) passes no relevance
                den = stabilize(zg, group.stabilizer)
                coef = jnp.where(den == 0, 0, group.scale * layer.y / jnp.where(den == 0, 1, den))
            if group.where == "pos":
                coef = jnp.where(layer.y > 0, coef, 0)
            elif group.where == "neg":
                coef = jnp.where(layer.y < 0, coef, 0)
            out = out + (zg - lax.stop_gradient(zg)) * lax.stop_gradient(coef)
        return out


@dataclasses.dataclass(frozen=True)
class LRP0(Rule):
    """LRP-0: R_i = sum_j a_i w_ij / z_j R_j (gradient x input)."""

    name = "lrp0"

    def groups(self, layer: _Layer) -> tuple[_Group, ...]:
        return (_Group((_Term("x", _same, _same),), stabilizer=None),)

    def propagate(self, layer: _Layer) -> Array:
        if layer.probe is None:  # the plain gradient is LRP-0
            return layer.z
        return super().propagate(layer)


@dataclasses.dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon: R_i = sum_j a_i w_ij / (z_j + eps sign(z_j)) R_j; absorbs weak z_j."""

    epsilon: float = 1e-6
    name = "epsilon"

    def __post_init__(self) -> None:
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")

    def groups(self, layer: _Layer) -> tuple[_Group, ...]:
        return (_Group((_Term("x", _same, _same),), stabilizer=self.epsilon),)


@dataclasses.dataclass(frozen=True)
class Gamma(Rule):
    """LRP-gamma: weights w + gamma w+ favour positive evidence (zennit's generalised form).

    For y > 0 the positive contributions (x+ with w + gamma w+, x- with w + gamma w-)
    share the relevance, for y < 0 the negative ones; with x >= 0 this is the thesis's
    eq. 3.19.
    """

    gamma: float = 0.25
    name = "gamma"

    def __post_init__(self) -> None:
        if not self.gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")

    def groups(self, layer: _Layer) -> tuple[_Group, ...]:
        g = self.gamma

        def up(w: Array) -> Array:
            return w + g * jnp.maximum(w, 0)

        def down(w: Array) -> Array:
            return w + g * jnp.minimum(w, 0)

        positive = _Group((_Term("pos", up, up), _Term("neg", down, None)), where="pos")
        negative = _Group((_Term("pos", down, down), _Term("neg", up, None)), where="neg")
        return positive, negative


@dataclasses.dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta: alpha * (positive share) - beta * (negative share), alpha - beta = 1."""

    alpha: float = 2.0
    beta: float = 1.0
    name = "alphabeta"

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {self.alpha}, {self.beta}")
        if self.alpha - self.beta != 1:
            raise ValueError(
                f"alpha - beta must equal 1 (conservation), got "
                f"alpha={self.alpha}, beta={self.beta}"
            )

    def groups(self, layer: _Layer) -> tuple[_Group, ...]:
        positive = _Group((_Term("pos", _pos, _pos), _Term("neg", _neg, None)), scale=self.alpha)
        if self.beta == 0:
            return (positive,)
        negative = _Group((_Term("pos", _neg, _neg), _Term("neg", _pos, None)), scale=-self.beta)
        return positive, negative


@dataclasses.dataclass(frozen=True)
class ZPlus(Rule):
    """LRP-z+: only positive contributions share the relevance (alpha=1, beta=0)."""

    name = "zplus"

    def groups(self, layer: _Layer) -> tuple[_Group, ...]:
        return (_Group((_Term("pos", _pos, _pos), _Term("neg", _neg, None))),)


@dataclasses.dataclass(frozen=True)
class ZBox(Rule):
    """z^B (DTD) for a bounded input layer, low <= x <= high.

    R_i = (x_i w_ij - l_i w+_ij - h_i w-_ij) / z^B_j R_j; the models rescale pixels to
    [0, 1] before their first layer, hence the default bounds.
    """

    low: float = 0.0
    high: float = 1.0
    name = "zb"
    input_only = True

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"zb needs low < high, got {self.low}, {self.high}")

    def groups(self, layer: _Layer) -> tuple[_Group, ...]:
        return (
            _Group(
                (
                    _Term("x", _same, None),
                    _Term("const", _pos, None, -1.0, self.low),
                    _Term("const", _neg, None, -1.0, self.high),
                )
            ),
        )


@dataclasses.dataclass(frozen=True)
class Flat(Rule):
    """Flat: relevance spread uniformly over each unit's receptive field (input layer)."""

    name = "flat"
    input_only = True

    def groups(self, layer: _Layer) -> tuple[_Group, ...]:
        return (_Group((_Term("const", jnp.ones_like, None),)),)


@dataclasses.dataclass(frozen=True)
class WSquare(Rule):
    """w^2: relevance spread in proportion to the squared weights (input layer)."""

    name = "wsquare"
    input_only = True

    def groups(self, layer: _Layer) -> tuple[_Group, ...]:
        return (_Group((_Term("const", jnp.square, jnp.square),)),)


@dataclasses.dataclass(frozen=True)
class Pass(Rule):
    """Identity rule for batch norm: relevance passes unchanged, the bias is ignored."""

    name = "pass"
    linear = False

    def propagate(self, layer: _Layer) -> Array:
        if layer.probe is not None:
            raise ValueError(f"rule 'pass' cannot be used at the input layer {layer.path!r}")
        x = layer.x
        safe = jnp.where(x == 0, 1, x)
        coef = jnp.where(x == 0, 0, layer.y / safe)  # R_x = x * coef * c = y * c = R_y
        return lax.stop_gradient(layer.z) + (x - lax.stop_gradient(x)) * lax.stop_gradient(coef)


@dataclasses.dataclass(frozen=True)
class ZAbs(Rule):
    """The |z| rule for a batch norm ``y = s * x + t`` (Hui & Binder 2019).

    L. Y. W. Hui and A. Binder, "BatchNorm Decomposition for Deep Neural Network
    Interpretation", IWANN 2019, LNCS 11507, pp. 280-291: per channel,
    ``R_x = |s x| / (|s x| + |t| + eps) * R_y``. The input's share is the magnitude of
    its term against the bias's, so the relevance keeps its sign (the epsilon rule's
    ``s x / y`` flips it where the bias outweighs and opposes ``s x``) and never grows
    (the share is at most 1); the bias's share is absorbed. This is the rule on the
    batch norm's affine form, ``s = scale / sqrt(var + eps)`` and
    ``t = bias - mean * s``, i.e. on the map the layer computes; torchexplain
    (explain/autograd.py) applies the same formula to the raw ``scale`` and ``bias``
    parameters, without the running mean and variance.
    """

    epsilon: float = 1e-6
    name = "zabs"
    linear = False

    def __post_init__(self) -> None:
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")

    def propagate(self, layer: _Layer) -> Array:
        if layer.probe is not None:
            raise ValueError(f"rule 'zabs' cannot be used at the input layer {layer.path!r}")
        x = layer.x
        sx = jnp.abs(layer.kernel * x)
        t = jnp.abs(layer.bias) if layer.bias is not None else jnp.zeros_like(sx)
        den = sx + t + jnp.asarray(self.epsilon, sx.dtype)
        share = jnp.where(den == 0, 0, sx / jnp.where(den == 0, 1, den))
        # R_x = x * coef * c with c = R_y / y, so coef = share * y / x (0 where x == 0).
        coef = jnp.where(x == 0, 0, share * layer.y / jnp.where(x == 0, 1, x))
        return lax.stop_gradient(layer.z) + (x - lax.stop_gradient(x)) * lax.stop_gradient(coef)


# name -> (constructor, parameter names) for the composite syntax
RULES: dict[str, tuple[type[Rule], tuple[str, ...]]] = {
    "lrp0": (LRP0, ()),
    "epsilon": (Epsilon, ("epsilon",)),
    "gamma": (Gamma, ("gamma",)),
    "zplus": (ZPlus, ()),
    "alphabeta": (AlphaBeta, ("alpha", "beta")),
    "zb": (ZBox, ("low", "high")),
    "flat": (Flat, ()),
    "wsquare": (WSquare, ()),
    "pass": (Pass, ()),
    "zabs": (ZAbs, ("epsilon",)),
}


def _rule_help() -> str:
    return ", ".join(
        f"{name}" + "".join(f"[:{p}]" for p in params) for name, (_, params) in RULES.items()
    )


def make_rule(spec: str) -> Rule:
    """A rule from 'name[:arg[:arg]]', e.g. 'epsilon:0.25', 'alphabeta:1:0', 'zb:0:1'."""
    name, *args = spec.strip().split(":")
    if name not in RULES:
        raise ValueError(f"unknown LRP rule {name!r} in {spec!r}; valid rules: {_rule_help()}")
    cls, params = RULES[name]
    if len(args) > len(params):
        raise ValueError(
            f"rule {name!r} takes at most {len(params)} argument(s) "
            f"({', '.join(params) or 'none'}), got {spec!r}"
        )
    try:
        values = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"rule arguments must be numbers, got {spec!r}") from None
    return cls(**dict(zip(params, values)))


# --- composites --------------------------------------------------------------------

KEYWORDS = ("input", "dense", "conv", "depthwise", "pointwise", "bn")


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """How a composite sees a layer: its module path, kind tags and input-ness."""

    path: str
    tags: frozenset[str]  # subset of {'dense', 'conv', 'depthwise', 'pointwise', 'bn'}
    is_input: bool


@dataclasses.dataclass(frozen=True)
class Composite:
    """Ordered (selector, rule) pairs; the first selector that matches a layer wins.

    Selectors: 'input' (the first layer the model calls), 'dense', 'conv', 'depthwise',
    'pointwise', 'bn' (batch norms not merged into the layer before them), or a glob on
    the module path ('conv[2-3]', 'block1', 'block*/residual'). For conv/dense layers a
    glob also matches any leading part of the path ('block1' covers
    'block1/sepconv_a/depthwise'); batch norms are matched only by 'bn' or a glob on
    their full path. Layers no entry matches keep their plain gradient (LRP-0).
    """

    entries: tuple[tuple[str, Rule], ...]
    name: str = "custom"

    def rule_for(self, info: LayerInfo) -> Rule:
        """The rule for `info` (raises if it is an input-only rule on a hidden layer)."""
        is_bn = "bn" in info.tags
        for selector, rule in self.entries:
            if _matches(selector, info, is_bn) and (rule.linear or is_bn):
                if rule.input_only and not info.is_input:
                    raise ValueError(
                        f"rule {rule.name!r} ({selector}={rule.name}) applies only "
                        f"to the input layer, not to {info.path!r}"
                    )
                return rule
        return LRP0()


def _matches(selector: str, info: LayerInfo, is_bn: bool) -> bool:
    if selector == "input":
        return info.is_input
    if selector in KEYWORDS:
        return selector in info.tags
    if is_bn:
        return fnmatch.fnmatchcase(info.path, selector)
    parts = info.path.split("/")
    return any(fnmatch.fnmatchcase("/".join(parts[:k]), selector) for k in range(1, len(parts) + 1))


def parse_composite(spec: str, name: str = "custom") -> Composite:
    """A composite from 'selector=rule[:args],...', first match wins.

    Example: 'input=zb:0:1,conv[2-3]=gamma:0.25,conv=epsilon:0.25,dense=lrp0,bn=epsilon'.
    Selectors are described in `Composite`; rules are `RULES` with ':'-separated numbers.
    """
    entries = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        selector, eq, rule = item.partition("=")
        if not eq or not selector.strip() or not rule.strip():
            raise ValueError(
                f"bad composite entry {item!r} in {spec!r}: expected "
                f"'selector=rule[:args]'; selectors: {', '.join(KEYWORDS)} or a "
                f"layer-path glob; rules: {_rule_help()}"
            )
        try:
            entries.append((selector.strip(), make_rule(rule)))
        except ValueError as e:
            raise ValueError(f"in composite entry {item!r}: {e}") from None
    if not entries:
        raise ValueError(f"empty composite {spec!r}; named composites: {sorted(COMPOSITES)}")
    return Composite(tuple(entries), name)


# Gamma for the early convolutions, epsilon for the middle, LRP-0 for the dense head,
# z^B at the input (Heggen's thesis, section 3.4.2). "Early" = the first two conv stages
# (ConvNet conv2-3, mini Xception blocks 1-2); epsilon 0.25 absorbs weak, noisy evidence,
# so "thesis" does not conserve by design. z+ and alpha-beta conserve only where a
# layer has positive contributions: not on a depthwise conv with negative outputs (it
# feeds the pointwise conv without a ReLU), so zennit's epsilon-plus-flat loses
# relevance on the mini Xception; gamma treats negative outputs too.
_THESIS = (
    "input=zb:0:1,conv[2-3]=gamma:0.25,block[1-2]=gamma:0.25,conv=epsilon:0.25,"
    "dense=lrp0,bn=epsilon:0.25"
)

COMPOSITES: dict[str, Composite] = {
    "thesis": parse_composite(_THESIS, "thesis"),
    "lrp0": parse_composite("conv=lrp0,dense=lrp0,bn=lrp0", "lrp0"),
    "epsilon": parse_composite("conv=epsilon,dense=epsilon,bn=epsilon", "epsilon"),
    "epsilon-gamma-box": parse_composite(
        "input=zb:0:1,conv=gamma:0.25,dense=epsilon,bn=epsilon", "epsilon-gamma-box"
    ),
    "epsilon-plus-flat": parse_composite(
        "input=flat,conv=zplus,dense=epsilon,bn=epsilon", "epsilon-plus-flat"
    ),
    "alpha1-beta0": parse_composite("conv=alphabeta:1:0,dense=epsilon,bn=epsilon", "alpha1-beta0"),
    "alpha2-beta1": parse_composite("conv=alphabeta:2:1,dense=epsilon,bn=epsilon", "alpha2-beta1"),
}


def get_composite(composite: str | Composite) -> Composite:
    """A `Composite`, a name in `COMPOSITES`, or a spec string for `parse_composite`."""
    if isinstance(composite, Composite):
        return composite
    if composite in COMPOSITES:
        return COMPOSITES[composite]
    if "=" not in composite:
        raise ValueError(
            f"unknown composite {composite!r}; named composites: "
            f"{sorted(COMPOSITES)}, or 'selector=rule,...' with rules: "
            f"{_rule_help()}"
        )
    return parse_composite(composite)


# --- the interceptor ---------------------------------------------------------------


def _conv_tags(module: nn.Conv) -> frozenset[str]:
    tags = {"conv"}
    if module.feature_group_count > 1:
        tags.add("depthwise")
    kernel = (
        module.kernel_size if isinstance(module.kernel_size, Sequence) else (module.kernel_size,)
    )
    if module.feature_group_count == 1 and all(k == 1 for k in kernel):
        tags.add("pointwise")
    return frozenset(tags)


@dataclasses.dataclass
class _Linear:
    """A conv/dense call as the LRP pass saw it, kept for merging a batch norm into it."""

    output: Array  # what the call returned (a batch norm merges if its input is this)
    path: str
    tags: frozenset[str]
    x: Array
    kernel: Array
    bias: Array | None
    linear: Callable[[Array, Array], Array]
    probe: Array | None


@dataclasses.dataclass(frozen=True)
class BatchNormPlan:
    """How the LRP pass treated a model's batch norms (`batchnorm_plan`).

    `merged`: (layer path, batch norm path) pairs, each batch norm merged into the conv or
    dense layer before it; `unmerged`: batch norms with their own rule (selector ``bn``).
    """

    merged: tuple[tuple[str, str], ...]
    unmerged: tuple[str, ...]


def _interceptor(composite: Composite, probe: Array, plan: dict[str, list]) -> Callable[..., Any]:
    # Trace-time bookkeeping local to one `lrp` call: whether the input layer has been
    # seen, whether we are inside our own modified-term computation, and the conv/dense
    # calls a batch norm may merge into.
    state: dict[str, Any] = {"seen_input": False, "busy": False, "linears": []}

    def linear_of(module: nn.Module) -> Callable[[Array, Array], Array]:
        bare = module.clone(parent=None, use_bias=False)

        def linear(x: Array, kernel: Array) -> Array:
            state["busy"] = True
            try:
                return bare.apply({"params": {"kernel": kernel}}, x)
            finally:
                state["busy"] = False

        return linear

    def input_probe(x: Array) -> Array | None:
        # The input layer: the first layer called, if it sees an input-shaped tensor.
        if state["seen_input"]:
            return None
        state["seen_input"] = True
        return probe if x.shape == probe.shape else None

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if state["busy"] or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(module.scope.path)
        if isinstance(module, (nn.Dense, nn.Conv)):
            x = args[0]
            z = next_fun(*args, **kwargs)
            params = module.variables["params"]
            bias = params.get("bias") if module.use_bias else None
            tags = frozenset({"dense"}) if isinstance(module, nn.Dense) else _conv_tags(module)
            u = input_probe(x)
            rule = _linear_rule(composite, path, tags, u)
            layer = _Layer(path, x, z, z, params["kernel"], bias, linear_of(module), u)
            out = rule.propagate(layer)
            state["linears"].append(
                _Linear(out, path, tags, x, params["kernel"], bias, layer.linear, u)
            )
            return out
        if isinstance(module, nn.BatchNorm):
            return _batchnorm(module, path, args, kwargs, next_fun)
        return next_fun(*args, **kwargs)

    def _batchnorm(module, path, args, kwargs, next_fun):
        if not module.use_running_average and not kwargs.get("use_running_average"):
            raise ValueError(f"LRP needs batch norm {path!r} in inference mode (train=False)")
        if module.axis not in (-1,):
            raise NotImplementedError(f"batch norm {path!r}: only axis=-1 is supported")
        x = args[0]
        y = next_fun(*args, **kwargs)
        mul, shift = canonize.affine(module)
        source = next((s for s in reversed(state["linears"]) if s.output is x), None)
        if source is not None:  # merged: the layer before's rule, with W' and b'
            plan["merged"].append((source.path, path))
            kernel, bias = canonize.merge(source.kernel, source.bias, mul, shift)
            rule = _linear_rule(composite, source.path, source.tags, source.probe)
            return rule.propagate(
                _Layer(source.path, source.x, y, y, kernel, bias, source.linear, source.probe)
            )
        plan["unmerged"].append(path)
        u = input_probe(x)
        rule = composite.rule_for(LayerInfo(path, frozenset({"bn"}), u is not None))
        return rule.propagate(_Layer(path, x, y, y, mul, shift, lambda a, w: a * w, u))

    return intercept


def _linear_rule(composite: Composite, path: str, tags: frozenset[str], probe: Any) -> Rule:
    rule = composite.rule_for(LayerInfo(path, tags, probe is not None))
    if not rule.linear:
        raise ValueError(f"rule {rule.name!r} is for batch norm only, not {path!r}")
    return rule


def _warn_unmerged(plan: dict[str, list]) -> None:
    if plan["unmerged"]:
        warnings.warn(
            f"LRP: batch norm(s) {', '.join(plan['unmerged'])} do not directly follow a "
            "convolution or dense layer, so they are not merged into one; each keeps its "
            "own rule (composite selector 'bn')",
            canonize.UnmergedBatchNorm,
            stacklevel=3,
        )


# --- public entry points -------------------------------------------------------------


def lrp(
    apply_fn: Callable[[Any, Array], Array],
    variables: Any,
    inputs: Array,
    cotangent: Array | float = 1.0,
    *,
    composite: str | Composite = "thesis",
    plan: dict[str, list] | None = None,
) -> tuple[Array, Array]:
    """(outputs, relevance of `inputs`) for explaining `sum(cotangent * outputs)`.

    `apply_fn(variables, inputs)` runs a Flax model; its Dense/Conv/BatchNorm calls follow
    the composite's rules, batch norms merged into the layer before them where they
    directly follow one (`jaxrepro.explain.canonize`). If `plan` is a dict, it receives
    the lists "merged" and "unmerged" (see `BatchNormPlan`). General form behind
    `attribute`; jit-compatible.
    """
    comp = get_composite(composite)
    inputs = jnp.asarray(inputs)
    plan = {"merged": [], "unmerged": []} if plan is None else plan
    plan.setdefault("merged", [])
    plan.setdefault("unmerged", [])

    def forward(probe: Array) -> Array:
        # The probe scales the inputs too (exactly: times 1), so relevance that reaches
        # the input other than through the input layer is gradient x input as well.
        with nn.intercept_methods(_interceptor(comp, probe, plan)):
            return apply_fn(variables, inputs * probe)

    outputs, vjp = jax.vjp(forward, jnp.ones_like(inputs))
    _warn_unmerged(plan)
    seed = jnp.broadcast_to(jnp.asarray(cotangent, outputs.dtype), outputs.shape)
    (relevance,) = vjp(seed)
    return outputs, relevance


@functools.partial(jax.jit, static_argnames=("model", "composite"))
def _attribute(model, variables, images, signs, targets, composite):
    def score(v, x):
        return heads.score(heads.inference_apply(model, v, x), signs, targets)

    return lrp(score, variables, images, composite=composite)[1]


def attribute(
    model: nn.Module,
    variables: Any,
    images: Array,
    *,
    sign: float | Array = 1.0,
    target: int | Array | None = None,
    composite: str | Composite = "thesis",
) -> Array:
    """LRP relevance [N, H, W, C] of the explained score w.r.t. the model's input.

    Any Flax Linen model: `images` [N, H, W, C] in the model's own input units (the
    paper's models: pixels 0..255), float32 or float64 (the relevance has their dtype;
    integer pixels are taken as float32). The explained score is `heads.score`:
    `sign * logit` for a one-logit head ([N] or [N, 1]; +1 explains class 1, -1 class 0;
    a float or an [N] array), the logit of class `target` for a multi-class head
    (default: the predicted class). `composite`: a name in `COMPOSITES`, a spec string
    (`parse_composite`) or a `Composite`. Batch norms that directly follow a conv or
    dense layer are merged into it; the others get their own rule, with an
    `UnmergedBatchNorm` warning. For conserving rules `relevance.sum()` is about the
    score minus what biases (and epsilon) absorb. Jitted (the model static); same
    inputs, same bits.
    """
    images = heads.as_input(images)
    n = images.shape[0]
    return _attribute(
        model,
        variables,
        images,
        heads.signs(sign, n, images.dtype),
        heads.targets(target, n),
        get_composite(composite),
    )


def batchnorm_plan(model: nn.Module, variables: Any, images: Array) -> BatchNormPlan:
    """Which batch norms of `model` LRP merges into the layer before them, found by
    tracing it on `images` (shapes only; nothing is computed)."""
    plan: dict[str, list] = {"merged": [], "unmerged": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", canonize.UnmergedBatchNorm)
        jax.eval_shape(
            lambda v, x: lrp(lambda v, x: heads.inference_apply(model, v, x), v, x, plan=plan)[1],
            variables,
            heads.as_input(images),
        )
    return BatchNormPlan(tuple(plan["merged"]), tuple(plan["unmerged"]))


def heatmap(relevance: Array) -> Array:
    """Per-pixel relevance [N, H, W]: the sum over colour channels (keeps conservation)."""
    return jnp.sum(relevance, axis=-1)
