# %% [markdown]
# # Build your own network
#
# The lecture's recipe for a machine-learning system, step by step, with funcnet:
#
# 1. **training data** $\{\mathbf{x}_i, \mathbf{y}_i\}_{i=1}^N$ — the bundled 8x8 digits;
# 2. a **decision function** $\hat{\mathbf{y}} = f_{\boldsymbol\theta}(\mathbf{x}_i)$ — an MLP,
#    then a small CNN, built from funcnet layers;
# 3. a **loss** $\ell(\hat{\mathbf{y}}, \mathbf{y}_i)$ — softmax cross-entropy;
# 4. the **goal** $\boldsymbol\theta^* = \arg\min_{\boldsymbol\theta} \sum_i
#    \ell(f_{\boldsymbol\theta}(\mathbf{x}_i), \mathbf{y}_i)$;
# 5. **train with back-propagation and SGD**: small steps against the gradient,
#    $\boldsymbol\theta \leftarrow \boldsymbol\theta - \eta \nabla \ell$.
#
# Runs in well under a minute on a laptop CPU.

# %%
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import funcnet as fn

# Without ipywidgets, tqdm's notebook bar falls back to a text bar (and says so).
warnings.filterwarnings("ignore", message="IProgress not found")

# %% [markdown]
# ## 1. Training data
#
# scikit-learn ships 1,797 handwritten digits as 8x8 grey images. `fn.data.digits()` returns
# them as NHWC float32 in [0, 1] with integer labels, split 80/20 into train and test with
# the classes in the same proportions (stratified, seeded).

# %%
split = fn.data.digits(seed=0)
print("train", split.x_train.shape, split.y_train.shape, "test", split.x_test.shape)
print("classes", np.bincount(split.y_train))

fig, axes = plt.subplots(2, 10, figsize=(10, 2.3))
for ax, img, label in zip(axes.flat, split.x_train, split.y_train):
    ax.imshow(img[:, :, 0], cmap="gray_r")
    ax.set_title(str(label), fontsize=9)
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The decision function: a multilayer perceptron
#
# A network is a chain of functions $f = f_{L+1} \circ f_L \circ \dots \circ f_1$. In funcnet
# that is `fn.Serial([...])`; each layer is an immutable description of hyper-parameters, and
# the parameters $\boldsymbol\theta$ are a separate pytree (a tuple with one dict per layer).
# The network outputs logits; the softmax is folded into the loss.

# %%
mlp = fn.Serial([
    fn.Flatten(),
    fn.Dense(128), fn.ReLU(),
    fn.Dense(64), fn.ReLU(),
    fn.Dense(10),
])  # fmt: skip
print(fn.summary(mlp, (8, 8, 1)))

params = mlp.init(jax.random.key(0), (8, 8, 1))
print("\nparams[1]:", {k: v.shape for k, v in params[1].items()})

# %% [markdown]
# ## 3. The loss and 4. the goal
#
# For classification the lecture uses cross-entropy on a softmax output layer,
# $\ell = -\log \mathrm{softmax}(\mathbf{b})_{y}$, averaged over a batch. Before training,
# with small random weights, the network guesses: the loss is close to $\log 10 \approx 2.30$.

# %%
logits = mlp.apply(params, split.x_train)
print("initial loss", float(fn.losses.softmax_cross_entropy(logits, split.y_train)))
print("log(10)     ", float(np.log(10)))

# %% [markdown]
# ## 5. Training with back-propagation and SGD
#
# `jax.grad` back-propagates through the whole network. One SGD step is three lines; `jax.jit`
# compiles it into one static XLA program.

# %%
def loss_fn(params, x, y):
    return fn.losses.softmax_cross_entropy(mlp.apply(params, x), y)


@jax.jit
def sgd_step(params, x, y, lr=0.1):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), loss


p = params
for step in range(201):
    batch = np.random.default_rng(step).choice(len(split.x_train), 32, replace=False)
    p, loss = sgd_step(p, split.x_train[batch], split.y_train[batch])
    if step % 50 == 0:
        print(f"step {step:3d}  loss {float(loss):.3f}")

# %% [markdown]
# `fn.train.fit` does the same with any optax optimizer, shuffled mini-batches, a progress
# bar, validation, and a history of the loss and accuracy per epoch. Here: plain SGD with
# momentum and the lecture's L2 regularizer $\lambda\,\Omega(\boldsymbol\theta)$ on the
# weights (`lam`).

# %%
mlp_result = fn.train.fit(
    mlp, params, split.x_train, split.y_train,
    optimizer=optax.sgd(0.05, momentum=0.9), regularizer=fn.regularizers.l2, lam=1e-4,
    epochs=30, batch_size=32, validation_data=(split.x_test, split.y_test), seed=0,
)  # fmt: skip
mlp_loss, mlp_acc = fn.train.evaluate(mlp, mlp_result.params, split.x_test, split.y_test)
print(f"MLP test loss {mlp_loss:.4f}, test accuracy {mlp_acc:.2%}")

# %% [markdown]
# ## A small convolutional network
#
# Convolutions share weights across positions and see local neighbourhoods; pooling makes
# the features robust to small shifts. `fn.summary` shows each layer's output shape,
# parameter count, FLOPs, and the **receptive field** (RF) of one unit in input pixels,
# with its **jump** (the distance in input pixels between neighbouring units).

# %%
cnn = fn.Serial([
    fn.Conv(16, (3, 3), padding="SAME"), fn.ReLU(), fn.MaxPool(2),
    fn.Conv(32, (3, 3), padding="SAME"), fn.ReLU(), fn.MaxPool(2),
    fn.Flatten(),
    fn.Dense(128), fn.ReLU(),
    fn.Dense(10),
])  # fmt: skip
print(fn.summary(cnn, (8, 8, 1)))

# %% [markdown]
# Here with Adam with decoupled weight decay (AdamW) and a learning rate that decays along a
# cosine over 40 epochs of 45 steps — the recipe of the main experiment
# (`experiments/train_digits.py`), whose network this is.

# %%
cnn_params = cnn.init(jax.random.key(0), (8, 8, 1))
schedule = optax.cosine_decay_schedule(3e-3, decay_steps=40 * 45)
cnn_result = fn.train.fit(
    cnn, cnn_params, split.x_train, split.y_train,
    optimizer=optax.adamw(schedule, weight_decay=1e-2), epochs=40, batch_size=32,
    validation_data=(split.x_test, split.y_test), seed=0,
)  # fmt: skip
cnn_loss, cnn_acc = fn.train.evaluate(cnn, cnn_result.params, split.x_test, split.y_test)
print(f"CNN test loss {cnn_loss:.4f}, test accuracy {cnn_acc:.2%}")

# %% [markdown]
# ## Loss and accuracy curves

# %%
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
for name, result in [("MLP", mlp_result), ("CNN", cnn_result)]:
    h = result.history
    epochs = np.arange(1, len(h["loss"]) + 1)
    ax_loss.plot(epochs, h["loss"], label=f"{name} train")
    ax_loss.plot(epochs, h["val_loss"], "--", label=f"{name} test")
    ax_acc.plot(epochs, h["accuracy"], label=f"{name} train")
    ax_acc.plot(epochs, h["val_accuracy"], "--", label=f"{name} test")
ax_loss.set_yscale("log")
ax_loss.set_xlabel("epoch")
ax_loss.set_title("loss")
ax_acc.set_xlabel("epoch")
ax_acc.set_title("accuracy")
ax_acc.set_ylim(0.8, 1.0)
ax_loss.legend()
ax_acc.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What the CNN learned
#
# The 16 first-layer filters (3x3 kernels, `params[0]["w"]`, HWIO), and the feature maps they
# produce on one test digit (after the ReLU).

# %%
w1 = np.asarray(cnn_result.params[0]["w"][:, :, 0, :])  # (3, 3, 16)
fig, axes = plt.subplots(2, 8, figsize=(10, 2.8))
for i, ax in enumerate(axes.flat):
    ax.imshow(w1[:, :, i], cmap="RdBu", vmin=-np.abs(w1).max(), vmax=np.abs(w1).max())
    ax.set_title(f"filter {i}", fontsize=8)
    ax.axis("off")
plt.suptitle("first-layer filters (red: negative, blue: positive)")
plt.tight_layout()
plt.show()

x0 = split.x_test[:1]
first_two = fn.Serial(cnn.layers[:2])  # Conv + ReLU
maps = first_two.apply(cnn_result.params[:2], x0)[0]  # (8, 8, 16)
fig, axes = plt.subplots(2, 9, figsize=(11, 2.8))
axes.flat[0].imshow(x0[0, :, :, 0], cmap="gray_r")
axes.flat[0].set_title(f"input ({split.y_test[0]})", fontsize=8)
for i, ax in enumerate(list(axes.flat)[1:17]):
    ax.imshow(maps[:, :, i], cmap="magma")
    ax.set_title(f"map {i}", fontsize=8)
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Confusion matrix on the test set
#
# Row = true digit, column = predicted digit; the off-diagonal entries are the mistakes.

# %%
pred = np.asarray(jnp.argmax(fn.train.predict(cnn, cnn_result.params, split.x_test), axis=-1))
confusion = np.zeros((10, 10), int)
np.add.at(confusion, (split.y_test, pred), 1)
print(confusion)

fig, ax = plt.subplots(figsize=(4.5, 4))
ax.imshow(confusion, cmap="Blues")
for i in range(10):
    for j in range(10):
        if confusion[i, j]:
            ax.text(j, i, confusion[i, j], ha="center", va="center", fontsize=8,
                    color="white" if confusion[i, j] > confusion.max() / 2 else "black")
ax.set_xticks(range(10))
ax.set_yticks(range(10))
ax.set_xlabel("predicted")
ax.set_ylabel("true")
ax.set_title(f"CNN, test accuracy {np.mean(pred == split.y_test):.2%}")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Your own layer
#
# A layer is a frozen dataclass subclassing `fn.Layer`: its fields are hyper-parameters, and
# it declares its parameters (`param_specs` + `initializers`, any names), its **state**
# (`state_specs`: arrays carried from step to step but never trained) and its `forward(params,
# state, x, *, key, train) -> (y, new_state)`. Here a per-pixel gain and shift around a
# running mean of the input, which only training (`train=True`) updates; `fit` threads the
# state through every step and returns it as `result.model_state`. The layer has no
# hand-written `fwd` / `bwd`, so `grad="manual"` back-propagates through it with `jax.vjp` of
# its `forward` (every other layer uses its own rule); without a `flops` method its FLOPs are
# measured with XLA (`*` in the summary).

# %%
@dataclasses.dataclass(frozen=True, repr=False)
class Centre(fn.Layer):
    """y = gain * (x - mean) + shift per feature; mean: running mean of x (state)."""

    momentum: float = 0.9

    def param_specs(self, input_shape):
        c = self.output_shape(input_shape)[-1:]  # output_shape: the input's (default)
        return {"gain": c, "shift": c}

    def initializers(self):
        return {"gain": jax.nn.initializers.ones, "shift": jax.nn.initializers.zeros}

    def state_specs(self, input_shape):  # init_state: zeros of these shapes
        return {"mean": self.output_shape(input_shape)[-1:]}

    def forward(self, params, state, x, *, key, train):
        mean = state["mean"]
        if train:
            batch_mean = jnp.mean(x, axis=tuple(range(x.ndim - 1)))
            mean = self.momentum * mean + (1 - self.momentum) * batch_mean
        return params["gain"] * (x - mean) + params["shift"], {"mean": mean}

    def receptive_field(self, input_shape, rf):  # elementwise: unchanged
        return rf


own = fn.Serial([fn.Flatten(), Centre(), fn.Dense(64), fn.ReLU(), fn.Dense(10)])
print(fn.summary(own, (8, 8, 1)))
print("hand-written rule:", Centre.has_hand_rule())
own_params = own.init(jax.random.key(0), (8, 8, 1))
for grad in ("autodiff", "manual"):
    own_result = fn.train.fit(
        own, own_params, split.x_train, split.y_train, grad=grad, epochs=2,
        optimizer=optax.adam(1e-2), seed=0, progress=False,
    )  # fmt: skip
    _, own_acc = fn.train.evaluate(
        own, own_result.params, split.x_test, split.y_test, state=own_result.model_state
    )
    print(f"grad={grad!r}: test accuracy {own_acc:.2%}")

plt.figure(figsize=(2, 2))
plt.imshow(np.asarray(own_result.model_state[1]["mean"]).reshape(8, 8), cmap="gray_r")
plt.title("running mean (state)", fontsize=9)
plt.axis("off")
plt.show()
