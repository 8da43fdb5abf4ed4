"""A plain install (the core dependencies only) runs fit with its defaults; every optional
dependency belongs to an extra."""

import importlib.metadata
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTIONAL = ("sklearn", "matplotlib", "hypothesis", "chex", "nbformat", "nbclient", "torch")


def test_core_dependencies_exclude_the_optional_ones_and_extras_name_them():
    requires = importlib.metadata.requires("funcnet")  # the installed metadata
    core = " ".join(r for r in requires if "extra ==" not in r)
    for name in ("scikit-learn", "matplotlib", "hypothesis", "chex", "pytest", "torch"):
        assert name not in core, name
    assert "tqdm" in core  # fit's default progress bar
    extras = set(re.findall(r'extra == "([a-z]+)"', " ".join(requires)))
    assert {"data", "plots", "notebooks", "torch", "dev"} <= extras
    readme = (ROOT / "README.md").read_text()
    for extra in ("data", "plots", "notebooks", "torch", "dev"):
        assert f"| `{extra}` |" in readme, extra


def test_fit_with_its_defaults_needs_no_optional_dependency_and_digits_names_its_extra():
    # Block every optional package: importing any of them raises ImportError. One
    # subprocess for both checks (a fresh interpreter and JAX cost about 2 s each).
    script = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None
import numpy as np, jax, funcnet as fn
net = fn.Serial([fn.Flatten(), fn.Dense(3)])
x = np.random.default_rng(0).normal(size=(40, 2, 2, 1)).astype(np.float32)
y = np.arange(40) % 3
result = fn.train.fit(net, net.init(jax.random.key(0), (2, 2, 1)), x, y, epochs=2)
print(len(result.history["loss"]), result.stop_reason)
try:
    fn.data.digits()  # scikit-learn's bundled set, behind the data extra
except ImportError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    fit_line, _, error = out.stdout.partition("\n")
    assert fit_line.split() == ["2", "epochs"], out.stdout
    assert "pip install 'funcnet[data]'" in error, out.stdout + out.stderr
