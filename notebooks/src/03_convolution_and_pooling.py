# %% [markdown]
# # Convolution and pooling
#
# This notebook follows the lecture's slides on convolutional layers with funcnet:
#
# 1. the slide's 3x3 box filter on its 10x10 image, reproduced exactly;
# 2. what stride does (stride 1 vs stride 3);
# 3. receptive fields of stacked 3x3 and 5x5 convolutions, and of a convolution followed
#    by pooling;
# 4. the pooling variants (max, average, L2, L2 over features) side by side on one image.
#
# Everything uses funcnet's public API (`import funcnet as fn`). Arrays are NHWC.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits

import funcnet as fn

np.set_printoptions(linewidth=120)

# %% [markdown]
# ## 1. The slide's box filter
#
# Correlation (the lecture's "rotated convolution"): $h[m, n] = \sum_{k,l} f[k, l]\, I[m+k, n+l]$
# with the 3x3 box filter $f = \frac{1}{9}\mathbf{1}$. The image is zeros with a 5x5 block of
# 90s (one pixel inside it is 0) and a lone 90 below it.

# %%
image = np.zeros((10, 10), np.float32)
image[2:7, 3:8] = 90
image[5, 4] = 0
image[8, 2] = 90

box = jnp.full((3, 3, 1, 1), 1 / 9)  # HWIO: 3x3, one input channel, one filter
h = fn.ops.conv2d(jnp.asarray(image)[None, :, :, None], box, padding="VALID")
print("I =\n", image.astype(int))
print("\nh = I (correlated with) f, rounded:\n", np.round(np.asarray(h[0, :, :, 0])).astype(int))

# %% [markdown]
# This is the slide's 8x8 table, entry for entry. VALID correlation shrinks a 10x10 image by
# the filter size minus one: $10 - 3 + 1 = 8$.

# %%
fig, axes = plt.subplots(1, 2, figsize=(7, 3.4))
axes[0].imshow(image, cmap="gray", vmin=0, vmax=90)
axes[0].set_title("I (10x10)")
axes[1].imshow(h[0, :, :, 0], cmap="gray", vmin=0, vmax=90)
axes[1].set_title("h = box filter (8x8)")
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Stride
#
# "Stride is the number of pixels shifted in both dimensions." With stride $s$ the output of
# a $K \times K$ VALID correlation on an $N \times N$ input has $\lfloor (N - K)/s \rfloor + 1$
# positions per side; with SAME padding, $\lceil N/s \rceil$.

# %%
print(f"{'input':>6} {'kernel':>6} {'stride':>6} {'VALID':>7} {'SAME':>7}")
for n, k, s in [(7, 3, 1), (7, 3, 3), (10, 3, 1), (10, 3, 3), (200, 10, 1), (28, 5, 3)]:
    valid = fn.Conv(1, k, stride=s, padding="VALID").output_shape((n, n, 1))
    same = fn.Conv(1, k, stride=s, padding="SAME").output_shape((n, n, 1))
    print(f"{n:>6} {k:>6} {s:>6} {valid[0]:>4}x{valid[1]:<2} {same[0]:>4}x{same[1]:<2}")

# %% [markdown]
# On a digit from the bundled data set (8x8, upsampled to 24x24 so the effect is visible),
# a vertical-edge filter with stride 1 and with stride 3:

# %%
digits = load_digits()
digit = jnp.asarray(digits.images[0] / 16.0, jnp.float32)
digit = jnp.repeat(jnp.repeat(digit, 3, axis=0), 3, axis=1)[None, :, :, None]  # 24x24
edge = jnp.array([[1.0, 0.0, -1.0]] * 3)[:, :, None, None]  # 3x3 vertical edge detector

fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
axes[0].imshow(digit[0, :, :, 0], cmap="gray")
axes[0].set_title(f"input {digit.shape[1]}x{digit.shape[2]}")
for ax, s in zip(axes[1:], (1, 3)):
    out = fn.ops.conv2d(digit, edge, stride=s)
    ax.imshow(out[0, :, :, 0], cmap="RdBu")
    ax.set_title(f"stride {s}: {out.shape[1]}x{out.shape[2]}")
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Receptive fields
#
# The receptive field of a unit is the set of input pixels it depends on. We find it by brute
# force: the input pixels where the gradient of one central output unit is non-zero
# (positive inputs and weights, so no gradient cancels by accident).


# %%
def receptive_field(net, size=21):
    """Height and width of the input patch that one central output unit depends on."""
    shape = (size, size, 1)
    params = net.init(jax.random.key(0), shape)
    params = jax.tree_util.tree_map(jnp.abs, params)  # positive weights: no cancellation
    x = jnp.ones((1, *shape))
    out_h, out_w = net.output_shape(shape)[:2]

    def unit(x):
        return net.apply(params, x)[0, out_h // 2, out_w // 2, 0]

    g = np.asarray(jax.grad(unit)(x)[0, :, :, 0])
    rows, cols = np.nonzero(g)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1, g != 0


cases = {
    "one 3x3 conv": fn.Serial([fn.Conv(1, 3)]),
    "two stacked 3x3 convs": fn.Serial([fn.Conv(1, 3), fn.ReLU(), fn.Conv(1, 3)]),
    "one 5x5 conv": fn.Serial([fn.Conv(1, 5)]),
    "two stacked 5x5 convs": fn.Serial([fn.Conv(1, 5), fn.ReLU(), fn.Conv(1, 5)]),
    "5x5 conv then 2x2 pool": fn.Serial([fn.Conv(1, 5), fn.AvgPool(2)]),
    "3x3 conv then 3x3 avg pool": fn.Serial([fn.Conv(1, 3), fn.AvgPool(3)]),
}
masks = {}
for name, net in cases.items():
    rh, rw, masks[name] = receptive_field(net)
    print(f"{name:<28} sees {rh}x{rw}")

# %% [markdown]
# Two stacked 3x3 convolutions see 5x5, two stacked 5x5 see 9x9, and a $K \times K$
# stride-1 convolution followed by $P \times P$ pooling sees $(P + K - 1) \times (P + K - 1)$:
# 5 + 2 - 1 = 6 and 3 + 3 - 1 = 5, as on the slide. The brute force uses average pooling:
# a max pool has the same connectivity, but its gradient reaches only the window's winner,
# so the gradient test would see only part of the field.

# %%
fig, axes = plt.subplots(1, len(masks), figsize=(2.2 * len(masks), 2.6))
for ax, (name, mask) in zip(axes, masks.items()):
    ax.imshow(mask, cmap="Greens")
    ax.set_title(name, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Pooling variants side by side
#
# - max: $h(x, y) = \max_{N(x,y)} h'$
# - average: $h(x, y) = \frac{1}{K} \sum_{N(x,y)} h'$
# - L2: $h(x, y) = \sqrt{\sum_{N(x,y)} h'^2}$
# - L2 over features: $h_j(x, y) = \sqrt{\sum_{k \in N(j)} h_k'^2}$ — it pools across
#   channels, not space, so we first make four feature maps (edge filters at 0, 90, 45
#   and 135 degrees) and pool them in orthogonal pairs.

# %%
x = jnp.asarray(digits.images[3] / 16.0, jnp.float32)
x = jnp.repeat(jnp.repeat(x, 4, axis=0), 4, axis=1)[None, :, :, None]  # 32x32

pools = {
    "max 2x2": fn.MaxPool(2),
    "average 2x2": fn.AvgPool(2),
    "L2 2x2": fn.L2Pool(2),
    "max 3x3, stride 1, SAME": fn.MaxPool(3, stride=1, padding="SAME"),
}
fig, axes = plt.subplots(1, 1 + len(pools), figsize=(2.4 * (1 + len(pools)), 2.8))
axes[0].imshow(x[0, :, :, 0], cmap="gray")
axes[0].set_title("input 32x32", fontsize=9)
for ax, (name, layer) in zip(axes[1:], pools.items()):
    y = layer.apply({}, x)
    ax.imshow(y[0, :, :, 0], cmap="gray")
    ax.set_title(f"{name}\n{y.shape[1]}x{y.shape[2]}", fontsize=9)
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %%
sobel = jnp.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
diag = jnp.array([[2.0, 1.0, 0.0], [1.0, 0.0, -1.0], [0.0, -1.0, -2.0]])
filters = jnp.stack([sobel, sobel.T, diag, diag[:, ::-1]], axis=-1)[:, :, None, :]  # 3x3x1x4
features = fn.ops.conv2d(x, filters, padding="SAME")  # (1, 32, 32, 4)
pooled = fn.FeatureL2Pool(2).apply({}, features)  # pairs of channels -> (1, 32, 32, 2)
print("features", features.shape, "-> L2 over features", pooled.shape)

fig, axes = plt.subplots(1, 6, figsize=(13, 2.6))
titles = ["0 deg", "90 deg", "45 deg", "135 deg", "L2(0, 90)", "L2(45, 135)"]
maps = [features[0, :, :, c] for c in range(4)] + [pooled[0, :, :, c] for c in range(2)]
for ax, m, t in zip(axes, maps, titles):
    ax.imshow(m, cmap="gray" if t.startswith("L2") else "RdBu")
    ax.set_title(t, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# L2 pooling over a pair of orthogonal edge detectors gives an edge strength that no longer
# depends on the edge's direction (or its sign): the pooled maps respond to every stroke.
# Max pooling over features (`FeatureMaxPool`, "maxout") is the same idea with a max
# instead of the L2 norm.
