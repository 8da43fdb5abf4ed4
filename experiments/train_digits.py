"""The main job: the digits network.

Until the training loop lands this builds the LeNet-style network for the 8x8x1 digits
(and the classic LeNet-5 for 28x28x1), prints their summaries, and runs one jitted
forward pass on random input to show the whole network compiles.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import funcnet as fn


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    for name, net, shape in [
        ("digits CNN (8x8x1)", fn.models.digits_cnn(), (8, 8, 1)),
        ("LeNet-5 (28x28x1)", fn.models.lenet5(), (28, 28, 1)),
    ]:
        print(f"\n{name}\n")
        print(fn.summary(net, shape))
        params = net.init(jax.random.key(args.seed), shape)
        x = jax.random.uniform(jax.random.key(args.seed + 1), (4, *shape))
        logits = jax.jit(net.apply)(params, x)
        print(
            f"\nforward pass on a batch of 4: logits {logits.shape}, finite: "
            f"{bool(jnp.all(jnp.isfinite(logits)))}"
        )


if __name__ == "__main__":
    main()
