"""Named PRNG streams: independent, reproducible, each overridable alone."""

import jax
import pytest
from conftest import assert_bitwise_equal

from jaxrepro import rng


def _data(key):
    return jax.random.key_data(key)


def test_streams_are_distinct_and_reproducible():
    keys = rng.stream_keys(1001)
    again = rng.stream_keys(1001)
    assert_bitwise_equal(
        {k: _data(v) for k, v in keys.items()}, {k: _data(v) for k, v in again.items()}
    )
    datas = [tuple(_data(v).tolist()) for v in keys.values()]
    assert len(set(datas)) == len(datas)


def test_seed_changes_every_stream():
    a, b = rng.stream_keys(1), rng.stream_keys(2)
    for name in rng.STREAMS:
        assert (_data(a[name]) != _data(b[name])).any(), name


def test_override_changes_only_that_stream():
    base = rng.stream_keys(1001)
    for name in rng.STREAMS:
        changed = rng.stream_keys(1001, {name: 5})
        for other in rng.STREAMS:
            same = bool((_data(base[other]) == _data(changed[other])).all())
            assert same == (other != name), (name, other)


def test_unknown_stream_is_an_error():
    with pytest.raises(ValueError, match="valid"):
        rng.stream_keys(0, {"nosuch": 1})


def test_step_keys_differ_per_step_and_work_under_jit():
    k = rng.stream_key(0, "dropout")
    d0, d1 = _data(rng.step_key(k, 0)), _data(rng.step_key(k, 1))
    assert (d0 != d1).any()
    assert_bitwise_equal(_data(jax.jit(rng.step_key)(k, 1)), d1)
