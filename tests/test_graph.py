"""graph: jaxpr / StableHLO / HLO text, AOT compilation, cost analysis of a forward pass and
of a jitted train step; cache: the persistent compilation cache hits in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import draw
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fn
from funcnet import graph

SHAPE = (12, 12, 1)


@pytest.fixture(scope="module")
def cnn():
    net = fn.Serial([
        fn.Conv(4, 3, padding="SAME"), fn.ReLU(), fn.MaxPool(2),
        fn.Flatten(), fn.Dense(10),
    ])  # fmt: skip
    return net, draw.params(net, SHAPE)


def test_jaxpr_stablehlo_and_hlo_show_the_network(cnn):
    from funcnet.nn.conv import plain_formulations

    net, _ = cnn
    # what runs: the one-channel convolution as conv.py's banded matmul
    jp = str(graph.jaxpr(net, SHAPE, batch=3))
    assert "conv_general_dilated" not in jp and "concatenate" in jp
    with plain_formulations():  # every convolution as lax's, as the lecture writes it
        jp = str(graph.jaxpr(net, SHAPE, batch=3))
        shlo = graph.stablehlo(net, SHAPE, batch=3)
        opt = graph.hlo(net, SHAPE, batch=3)
    for prim in ("conv_general_dilated", "reduce_window", "dot_general", "max"):
        assert prim in jp, prim
    assert "f32[3,12,12,1]" in jp  # the batch it was traced for
    assert "stablehlo.convolution" in shlo and "tensor<3x12x12x1xf32>" in shlo
    assert "ENTRY" in opt and "convolution" in opt
    assert "fusion" in opt or "fused" in opt  # optimised, not the lowered module


def test_aot_compiled_forward_matches_apply_and_rejects_other_shapes(cnn):
    net, params = cnn
    compiled = graph.compile(net, SHAPE, batch=2)
    assert isinstance(compiled, jax.stages.Compiled)
    x = draw.normal((2, *SHAPE), seed=1)
    np.testing.assert_allclose(compiled(params, x), net.apply(params, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError):
        compiled(params, jnp.ones((3, *SHAPE)))  # an AOT executable never re-traces


def test_cost_analysis_of_a_dense_layer_is_exact():
    cost = graph.cost_analysis(fn.Dense(7), (5,), batch=3)
    assert cost.flops == 3 * (2 * 5 * 7 + 7)
    assert cost.bytes_accessed >= 4 * (3 * 5 + 5 * 7 + 7 + 3 * 7)  # every operand read once
    assert cost.raw["flops"] == cost.flops


def _mlp_step():
    net = fn.models.mlp([32], 10)
    opt = optax.sgd(0.1)

    def loss(params, x, y):
        logits = net.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return net, opt, step


def test_train_step_costs_more_than_its_forward_pass_and_is_inspectable():
    net, opt, step = _mlp_step()
    shape, batch = (8, 8, 1), 16
    params = graph.abstract(draw.params(net, shape))
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree_util.tree_leaves(params))
    opt_state = jax.eval_shape(opt.init, params)
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    step_cost = graph.cost_analysis(step, params, opt_state, x, y)
    fwd_cost = graph.cost_analysis(net, shape, batch=batch)
    # Backward: a weight-gradient matmul per dense layer and an input-gradient one for all
    # but the first, plus the update: about 2-3x the forward.
    assert 1.8 * fwd_cost.flops < step_cost.flops < 4 * fwd_cost.flops
    assert "transpose" in str(graph.jaxpr(step, params, opt_state, x, y))
    with pytest.raises(TypeError, match="already is"):
        graph.lower(step, params, opt_state, x, y, donate_argnums=0)


def test_plain_functions_take_jit_options():
    def f(x, n):
        return x * n

    text = graph.stablehlo(f, jnp.ones(3), 5, static_argnums=1)
    assert "5.0" in text or "constant dense<5" in text or "5.000000e+00" in text
    assert graph.cost_analysis(f, jnp.ones(4), 2, static_argnums=1).flops == 4
    with pytest.raises(TypeError, match="network"):
        graph.cost_analysis(fn.Dense(3), (4,), (5,))


@pytest.mark.slow  # heavier integration check; CI runs the slow tier
def test_persistent_compilation_cache_hits_in_a_fresh_process(tmp_path):
    script = textwrap.dedent(
        """
        import json, sys
        import jax, jax.numpy as jnp
        from jax import monitoring
        import funcnet as fn
        from funcnet import cache
        events = []
        monitoring.register_event_listener(lambda name, **kw: events.append(name))
        cache.enable_compilation_cache(sys.argv[1])
        net = fn.models.mlp([16], 4)
        params = net.init(jax.random.key(0), (6,))
        jax.jit(net.apply)(params, jnp.ones((2, 6))).block_until_ready()
        print(json.dumps({
            "hits": events.count("/jax/compilation_cache/cache_hits"),
            "dir": str(cache.compilation_cache_dir()),
        }))
        """
    )
    cache_dir = tmp_path / "xla-cache"

    def run():
        out = subprocess.run(
            [sys.executable, "-c", script, str(cache_dir)],
            capture_output=True, text=True, timeout=120, check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold = run()
    assert cold["dir"] == str(cache_dir.resolve()) and any(cache_dir.iterdir())
    warm = run()
    assert cold["hits"] == 0 and warm["hits"] >= 1, (cold, warm)


def test_enable_compilation_cache_validates(tmp_path):
    from funcnet import cache

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        cache.enable_compilation_cache(f)
    with pytest.raises(ValueError, match="min_compile_time_secs"):
        cache.enable_compilation_cache(tmp_path, min_compile_time_secs=-1)


def test_a_network_of_integer_ids_is_traced_with_int32_input():
    """As export.save: an Embedding-first network (and, in summary, a user layer that
    takes ids without its own FLOP count) gets int32 placeholders, not float32 ones
    that its input check refuses."""
    import dataclasses

    net = fn.Serial([fn.Embedding(10, 4), fn.Flatten(), fn.Dense(2)])
    assert "i32[1,5]" in str(graph.jaxpr(net, (5,)))
    assert graph.cost_analysis(net, (5,)).flops > 0

    @dataclasses.dataclass(frozen=True, repr=False)
    class Lookup(fn.Layer):  # no flops(): summary measures it
        def output_shape(self, s):
            return (*s, 4)

        def param_specs(self, s):
            return {"table": (10, 4)}

        def initializers(self):
            return {"table": jax.nn.initializers.normal()}

        def takes_integers(self):
            return True

        def check_input(self, x):
            if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
                raise TypeError(f"Lookup: ids must be integers, got {jnp.asarray(x).dtype}")
            return jnp.asarray(x)

        def forward(self, params, state, x, *, key=None, train=False):
            return jnp.take(params["table"], x, axis=0), state

    rows = {line.split()[1] if line.split()[0].isdigit() else line.split()[0]: line.split()
            for line in str(fn.summary(fn.Serial([Lookup(), fn.Flatten(), fn.Dense(2)]),
                                       (5,))).splitlines() if line.strip()}
    assert rows["Lookup()"][4:6] == ["40", "50*"]  # params; FLOPs measured by XLA
    assert rows["total"][2] == "82"
