"""The lecture's receptive-field and parameter-count examples, read off ``fn.summary``.

Everything here is computed from shapes alone: the fully connected layer with 1.6e9
weights is described, never allocated. Run: ``python experiments/receptive_fields.py``.
"""

from __future__ import annotations

import funcnet as fn


def rf(net: fn.Serial, shape=(32, 32, 1)) -> str:
    s = fn.summary(net, shape)
    (rh, rw), (jh, jw) = s.receptive_field, s.jump
    return f"receptive field {rh}x{rw}, jump {jh}x{jw}"


def section(title: str) -> None:
    print(f"\n== {title} ==")


def main() -> None:
    section("Stacked convolutions (slide 'Receptive Field')")
    print("(a) two stacked 3x3 convolutions:", rf(fn.Serial([fn.Conv(1, 3), fn.Conv(1, 3)])))
    print("(b) two stacked 5x5 convolutions:", rf(fn.Serial([fn.Conv(1, 5), fn.Conv(1, 5)])))
    print("    three stacked 3x3 convolutions:",
          rf(fn.Serial([fn.Conv(1, 3), fn.Conv(1, 3), fn.Conv(1, 3)])))

    section("KxK stride-1 convolution then PxP pooling sees (P+K-1)x(P+K-1)")
    print(" K  P  P+K-1  summary")
    for k, p in [(3, 2), (5, 2), (5, 3), (10, 2)]:
        net = fn.Serial([fn.Conv(1, k), fn.ReLU(), fn.MaxPool(p)])
        print(f"{k:2d} {p:2d}  {p + k - 1:5d}  {rf(net)}")

    section("What stride does to the jump (effective stride)")
    for s1 in (1, 2, 3):
        net = fn.Serial([fn.Conv(1, 3, stride=s1), fn.Conv(1, 3)])
        print(f"3x3 stride {s1} then 3x3 stride 1: {rf(net)}"
              f"   (second layer adds (3-1)*{s1})")
    print("LeNet-5 on 28x28x1, layer by layer:")
    print(fn.summary(fn.models.lenet5(), (28, 28, 1)))

    section("Parameter counts: 200x200 image, 40K hidden units")
    image = (200, 200, 1)
    fc = fn.summary(fn.Serial([fn.Flatten(), fn.Dense(40_000)]), image)
    local = fn.summary(fn.LocallyConnected(1, (10, 10), padding="SAME", use_bias=False), image)
    conv = fn.summary(fn.Conv(100, (10, 10), padding="SAME", use_bias=False), image)
    print(f"fully connected      : {fc.rows[-1].param_shapes['w']} weights = "
          f"{fc.total_params - 40_000:,} (+40,000 biases)   slide: ~2B")
    print(f"locally connected    : 10x10 filter per unit, {local.output_shape} outputs = "
          f"{local.total_params:,} weights   slide: 4M")
    print(f"convolution          : 100 filters of 10x10 = {conv.total_params:,} weights"
          f"   slide: 10K")
    print("\nThe fully connected layer, as summary prints it (nothing allocated):")
    print(fc)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                            epilog="It takes no options.").parse_args()
    main()
