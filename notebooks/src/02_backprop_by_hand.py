# %% [markdown]
# # Back-propagation by hand
#
# The lecture computes gradients three ways: symbolically, numerically, and by
# back-propagation on a computational graph. funcnet has all three side by side:
#
# - `jax.grad` / `jax.vjp` — automatic differentiation;
# - `fn.vjp` — a **hand-written backward rule** for every op, loss and gate, derived from the
#   calculus on the slides, in the `jax.custom_vjp` convention: `fwd(*args) -> (out,
#   residuals)` and `bwd(residuals, g) -> cotangents`, where `g` is the upstream gradient;
# - `fn.gradcheck` — finite differences.
#
# This notebook reproduces the slides' worked examples exactly, then checks every layer's
# rule against autodiff and finite differences, and trains a CNN with the hand rules.

# %%
import warnings

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import funcnet as fn
from funcnet.vjp import gates

warnings.filterwarnings("ignore", message="IProgress not found")
jax.config.update("jax_enable_x64", True)  # float64 for exact arithmetic and finite differences


# %% [markdown]
# A small helper draws a computational graph: each node shows its forward value (green,
# above) and the gradient of the output with respect to it (red, below).

# %%
def draw_graph(nodes, edges, title, size=(10, 3.2)):
    """nodes: name -> (x, y, label, value, grad); edges: (src, dst) pairs."""
    _, ax = plt.subplots(figsize=size)
    for src, dst in edges:
        (x0, y0), (x1, y1) = nodes[src][:2], nodes[dst][:2]
        ax.annotate("", xy=(x1 - 0.22, y1), xytext=(x0 + 0.22, y0),
                    arrowprops=dict(arrowstyle="->", color="0.5"))
    for x, y, label, value, grad in nodes.values():
        ax.add_patch(plt.Circle((x, y), 0.22, fill=True, color="0.93", ec="0.3"))
        ax.text(x, y, label, ha="center", va="center", fontsize=10, weight="bold")
        ax.text(x, y + 0.33, f"{value:.4g}", ha="center", color="green", fontsize=9)
        ax.text(x, y - 0.4, f"{grad:.4g}", ha="center", color="red", fontsize=9)
    xs = [n[0] for n in nodes.values()]
    ys = [n[1] for n in nodes.values()]
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title + "   (green: forward value, red: gradient)")
    plt.show()


# %% [markdown]
# ## 1. $f(x, y, z) = (x + y) z$ at $x = -2, y = 5, z = -4$
#
# Forward: $q = x + y$ (an add gate), $f = q z$ (a multiply gate). Backward, from
# $\partial f / \partial f = 1$: the multiply gate *swaps* its inputs,
# $\partial f/\partial q = z$, $\partial f/\partial z = q$; the add gate *distributes*,
# $\partial f/\partial x = \partial f/\partial y = \partial f/\partial q \cdot 1$ (chain rule:
# upstream gradient times local gradient).

# %%
x, y, z = -2.0, 5.0, -4.0
q, add_res = gates.add_fwd(x, y)
f, mul_res = gates.multiply_fwd(q, z)

df = 1.0
dq, dz = gates.multiply_bwd(mul_res, df)
dx, dy = gates.add_bwd(add_res, dq)
print(f"forward:  q = {q}, f = {f}")
print(f"backward: df/dq = {dq}, df/dz = {dz}, df/dx = {dx}, df/dy = {dy}")

auto = jax.grad(lambda x, y, z: (x + y) * z, argnums=(0, 1, 2))(x, y, z)
print("jax.grad:", [float(v) for v in auto])
assert (float(dx), float(dy), float(dz)) == (-4.0, -4.0, 3.0)

# %%
draw_graph(
    {
        "x": (0, 1, "x", x, dx), "y": (0, 0, "y", y, dy), "z": (0, -1, "z", z, dz),
        "q": (1.5, 0.5, "+", q, dq), "f": (3, 0, "*", f, df),
    },
    [("x", "q"), ("y", "q"), ("q", "f"), ("z", "f")],
    "f = (x + y) z",
    size=(6, 3.4),
)  # fmt: skip

# %% [markdown]
# ## 2. The sigmoid neuron $f(w, x) = \dfrac{1}{1 + e^{-(w_0 x_0 + w_1 x_1 + w_2)}}$
#
# At $w = (2, -3, -3)$, $x = (-1, -2)$, as a graph of the slides' elementary gates:
# multiply, add, $\times(-1)$, $\exp$, $+1$, $1/x$, with local derivatives
# $e^x$, $a$, $1$ and $-1/x^2$.

# %%
w0, w1, w2 = 2.0, -3.0, -3.0
x0, x1 = -1.0, -2.0

# forward, keeping every gate's residuals
a0, r_a0 = gates.multiply_fwd(w0, x0)
a1, r_a1 = gates.multiply_fwd(w1, x1)
s, r_s = gates.add_fwd(a0, a1)
t, r_t = gates.add_fwd(s, w2)
u, r_u = gates.scale_fwd(t, -1.0)
e, r_e = gates.exp_fwd(u)
v, r_v = gates.add_const_fwd(e, 1.0)
out, r_out = gates.reciprocal_fwd(v)

# backward, in the reverse order
d_out = 1.0
(d_v,) = gates.reciprocal_bwd(r_out, d_out)[:1]
d_e = gates.add_const_bwd(r_v, d_v)[0]
d_u = gates.exp_bwd(r_e, d_e)[0]
d_t = gates.scale_bwd(r_u, d_u)[0]
d_s, d_w2 = gates.add_bwd(r_t, d_t)
d_a0, d_a1 = gates.add_bwd(r_s, d_s)
d_w0, d_x0 = gates.multiply_bwd(r_a0, d_a0)
d_w1, d_x1 = gates.multiply_bwd(r_a1, d_a1)

print(f"output f = {float(out):.4f}")
print(f"grad w   = ({float(d_w0):.4f}, {float(d_w1):.4f}, {float(d_w2):.4f})")
print(f"grad x   = ({float(d_x0):.4f}, {float(d_x1):.4f})")

# %%
draw_graph(
    {
        "w0": (0, 2, "w0", w0, d_w0), "x0": (0, 1, "x0", x0, d_x0),
        "w1": (0, 0, "w1", w1, d_w1), "x1": (0, -1, "x1", x1, d_x1),
        "w2": (0, -2, "w2", w2, d_w2),
        "a0": (1.5, 1.5, "*", a0, d_a0), "a1": (1.5, -0.5, "*", a1, d_a1),
        "s": (3, 0.5, "+", s, d_s), "t": (4.5, 0, "+", t, d_t),
        "u": (6, 0, "*-1", u, d_u), "e": (7.5, 0, "exp", e, d_e),
        "v": (9, 0, "+1", v, d_v), "out": (10.5, 0, "1/x", out, d_out),
    },
    [("w0", "a0"), ("x0", "a0"), ("w1", "a1"), ("x1", "a1"), ("a0", "s"), ("a1", "s"),
     ("s", "t"), ("w2", "t"), ("t", "u"), ("u", "e"), ("e", "v"), ("v", "out")],
    "the sigmoid neuron, gate by gate",
    size=(12, 4.2),
)  # fmt: skip

# %% [markdown]
# "Computational graph representation may not be unique": the four gates after the sum are
# one sigmoid, whose local gradient is $\sigma(x)(1 - \sigma(x))$. At $t = 1$:
# $[1.00] \times [(1 - 0.73)(0.73)] = 0.2$ — the slide's shortcut, exact here:

# %%
sig, r_sig = gates.sigmoid_fwd(t)
(d_t_sig,) = gates.sigmoid_bwd(r_sig, 1.0)[:1]
print(f"sigma(1) = {float(sig):.4f}, local gradient sigma (1 - sigma) = {float(d_t_sig):.4f}")
print("same as through the four gates:", np.isclose(d_t_sig, d_t))

neuron = lambda w, x: jax.nn.sigmoid(w[0] * x[0] + w[1] * x[1] + w[2])  # noqa: E731
gw, gx = jax.grad(neuron, argnums=(0, 1))(jnp.array([w0, w1, w2]), jnp.array([x0, x1]))
print("jax.grad: w", np.round(gw, 4), "x", np.round(gx, 4))

# %% [markdown]
# ## 3. Patterns in gradient flow
#
# - **add gate**: gradient *distributor* — each input gets the upstream gradient;
# - **copy gate** (fan-out): gradient *adder* — the input gets the sum of its outputs'
#   gradients;
# - **mul gate**: *swap multiplier* — each input gets the upstream gradient times the other;
# - **max gate**: gradient *router* — the larger input gets it all, the other 0.

# %%
g = 2.0
print("add      (3, -1), g=2 ->", [float(v) for v in gates.add_bwd(gates.add_fwd(3.0, -1.0)[1], g)])
c_res = gates.copy_fwd(3.0)[1]
print("copy     3 -> (3, 3), g=(2, 5) ->", [float(v) for v in gates.copy_bwd(c_res, (2.0, 5.0))])
print("multiply (3, -1), g=2 ->",
      [float(v) for v in gates.multiply_bwd(gates.multiply_fwd(3.0, -1.0)[1], g)])
print("max      (3, -1), g=2 ->",
      [float(v) for v in gates.maximum_bwd(gates.maximum_fwd(3.0, -1.0)[1], g)])

# %% [markdown]
# ## 4. Numerical differentiation
#
# $\dfrac{\partial f}{\partial x_i} \approx \dfrac{f(\mathbf{x} + h\mathbf{e}_i) -
# f(\mathbf{x})}{h}$ (forward) or $\dfrac{f(\mathbf{x} + h\mathbf{e}_i) - f(\mathbf{x} -
# h\mathbf{e}_i)}{2h}$ (central). The slides' example $f(W, x) = W \cdot x$ with
# $W = [-0.8, 0.3]$, $x = [0.5, -0.2]$: the gradient with respect to $W$ is $x$.

# %%
W = jnp.array([-0.8, 0.3])
xv = jnp.array([0.5, -0.2])
for method in ("forward", "central"):
    gW = fn.gradcheck.numerical_grad(lambda W: W @ xv, W, h=1e-6, method=method)
    print(f"{method:>8}: {np.asarray(gW)}  (exact {np.asarray(xv)})")

# %% [markdown]
# Error against $h$, for the sigmoid neuron's $\partial f/\partial w_0$ in float64: the
# truncation error falls as $h$ (forward) or $h^2$ (central) while the rounding error grows
# as $\epsilon / h$. The best $h$ is near $10^{-8}$ for forward and $10^{-5}$ for central
# differences; the lecture's usual $h = 10^{-6}$ is a good compromise for both.

# %%
w_vec, x_vec = jnp.array([w0, w1, w2]), jnp.array([x0, x1])
exact = float(d_w0)
hs = np.logspace(-13, -1, 49)
errors = {"forward": [], "central": []}
for h in hs:
    for method in errors:
        gnum = fn.gradcheck.numerical_grad(lambda w: neuron(w, x_vec), w_vec, h=float(h),
                                           method=method)
        errors[method].append(abs(float(gnum[0]) - exact) / abs(exact))

plt.figure(figsize=(6, 4))
for method, err in errors.items():
    plt.loglog(hs, np.maximum(err, 1e-17), "o-", ms=3, label=method)
plt.loglog(hs, hs, "k:", lw=0.8, label="~h (truncation, forward)")
plt.loglog(hs, hs**2, "k--", lw=0.8, label="~h² (truncation, central)")
plt.loglog(hs, 1e-16 / hs, "k-.", lw=0.8, label="~eps/h (rounding)")
plt.ylim(1e-17, 1)
plt.xlabel("h")
plt.ylabel("relative error")
plt.title("finite differences: truncation vs rounding")
plt.legend(fontsize=8)
plt.show()
best = {m: hs[int(np.argmin(e))] for m, e in errors.items()}
print({m: f"{h:.0e}" for m, h in best.items()})

# %% [markdown]
# ## 5. Every layer's hand-written rule, three ways
#
# For each op we compare the gradients of a scalar function of its inputs and parameters:
# **autodiff** (`jax.grad`), **manual** (the op wrapped by `fn.vjp.manual`, so `jax.grad`
# calls the hand-written `bwd`), and **fd** (central differences, $h = 10^{-6}$). The table
# is the maximum relative error of each pair over every element.

# %%
key = jax.random.key(0)
kx, kw, kb, kc = jax.random.split(key, 4)
X = jax.random.normal(kx, (2, 7, 7, 3))
cases = {
    "dense": (fn.ops.dense, lambda op, p: op(p["x"].reshape(2, -1), p["w"], p["b"]),
              {"x": X, "w": jax.random.normal(kw, (147, 4)), "b": jax.random.normal(kb, (4,))}),
    "conv2d stride 2 SAME": (fn.ops.conv2d, lambda op, p: op(p["x"], p["w"], p["b"], 2, "SAME"),
                             {"x": X, "w": jax.random.normal(kw, (3, 3, 3, 4)),
                              "b": jax.random.normal(kb, (4,))}),
    "conv2d dilation 2": (fn.ops.conv2d, lambda op, p: op(p["x"], p["w"], None, 1, "VALID", 2),
                          {"x": X, "w": jax.random.normal(kw, (2, 2, 3, 2))}),
    "max_pool 2x2": (fn.ops.max_pool, lambda op, p: op(p["x"], 2), {"x": X}),
    "max_pool 3x3 stride 2 SAME": (fn.ops.max_pool, lambda op, p: op(p["x"], 3, 2, "SAME"),
                                   {"x": X}),
    "avg_pool SAME excl. pad": (fn.ops.avg_pool, lambda op, p: op(p["x"], 3, 2, "SAME", False),
                                {"x": X}),
    "l2_pool 2x2": (fn.ops.l2_pool, lambda op, p: op(p["x"], 2), {"x": X}),
    "feature_l2_pool": (fn.ops.feature_l2_pool, lambda op, p: op(p["x"], 3), {"x": X}),
    "feature_max_pool": (fn.ops.feature_max_pool, lambda op, p: op(p["x"], 3), {"x": X}),
}  # fmt: skip
for name, (op, call, params) in cases.items():
    out_shape = jax.eval_shape(lambda p, op=op, call=call: call(op, p), params).shape
    c = jax.random.normal(kc, out_shape)  # a fixed random projection: a scalar to differentiate

    def scalar(p, op=op, call=call, c=c):
        return jnp.sum(c * call(op, p))

    def scalar_manual(p, op=op, call=call, c=c):
        return jnp.sum(c * call(fn.vjp.manual(op), p))

    grads = {
        "autodiff": jax.grad(scalar)(params),
        "manual": jax.grad(scalar_manual)(params),
        "fd": fn.gradcheck.numerical_grad(scalar, params, h=1e-6),
    }
    report = fn.gradcheck.compare(grads, tol={("autodiff", "manual"): 1e-10,
                                              ("manual", "fd"): 1e-6, ("autodiff", "fd"): 1e-6})
    print(f"--- {name}\n{report}\n")

# %% [markdown]
# ## 6. Training a CNN with the hand-written rules
#
# `fn.vjp.value_and_grad(net, loss)` back-propagates through a whole `Serial` in the
# lecture's four steps: (i) feed-forward, keeping each layer's residuals; (ii) back-propagate
# to the output layer ($\delta = \mathrm{softmax} - \mathrm{onehot}$ for cross-entropy);
# (iii) back-propagate through the hidden layers, each with its hand rule; (iv) the weight
# update, left to the optimizer. `fn.train.fit(..., grad="manual")` trains with it under
# `jit`. Trained side by side in float64 from the same initial parameters, the two runs
# agree to rounding error.

# %%
split = fn.data.digits(seed=0)
x_train, x_test = split.x_train.astype(np.float64), split.x_test.astype(np.float64)
cnn = fn.models.digits_cnn()
params0 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                 cnn.init(jax.random.key(0), (8, 8, 1)))

loss0, grads_manual = fn.vjp.value_and_grad(cnn, fn.losses.softmax_cross_entropy)(
    params0, x_train[:64], split.y_train[:64])
_, grads_auto = jax.value_and_grad(
    lambda p: fn.losses.softmax_cross_entropy(cnn.apply(p, x_train[:64]), split.y_train[:64])
)(params0)
print("one batch, manual vs autodiff:")
print(fn.gradcheck.compare({"autodiff": grads_auto, "manual": grads_manual}, tol=1e-10))

# %%
runs = {}
for grad in ("autodiff", "manual"):
    runs[grad] = fn.train.fit(
        cnn, params0, x_train, split.y_train, grad=grad,
        optimizer=optax.sgd(0.05, momentum=0.9), regularizer=fn.regularizers.l2, lam=1e-4,
        epochs=10, batch_size=32, validation_data=(x_test, split.y_test), seed=0,
    )  # fmt: skip

leaves = zip(jax.tree_util.tree_leaves(runs["autodiff"].params),
             jax.tree_util.tree_leaves(runs["manual"].params))
max_rel = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in leaves)
for grad, run in runs.items():
    print(f"{grad:>8}: final train loss {run.history['loss'][-1]:.6f}, "
          f"test accuracy {run.history['val_accuracy'][-1]:.2%}")
print(f"max relative difference of the trained parameters: {max_rel:.1e}")

plt.figure(figsize=(5, 3.2))
for grad, style in (("autodiff", "-"), ("manual", "--")):
    plt.semilogy(runs[grad].history["loss"], style, label=f"grad={grad!r}")
plt.xlabel("epoch")
plt.ylabel("training loss")
plt.legend()
plt.title("the same trajectory, two ways")
plt.show()
