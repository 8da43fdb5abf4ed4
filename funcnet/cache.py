"""Opt-in persistent compilation cache: compile a program once, reuse it across processes.

JAX can store every XLA executable it compiles in a directory, keyed by the program,
the compile options, the jax/jaxlib versions and the device. A later process (a rerun
of an experiment, a test worker) that compiles the same program loads it from there
instead of running XLA's optimisation passes again. By default JAX only caches programs
that took at least a second to compile; :func:`enable_compilation_cache` lowers the
thresholds so small networks (the digits CNN, LeNet-5) are cached too.

The cache is off unless you call this. Entries are never invalidated by hand: a change of
the network, shapes, dtypes, flags or versions changes the key. Deleting the directory
is always safe.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["compilation_cache_dir", "disable_compilation_cache", "enable_compilation_cache"]


def _reset_jax_cache() -> None:
    # JAX opens its cache once, at the first compile; a directory set afterwards is only
    # picked up after this reset (a private helper, hence the guard).
    try:
        from jax._src import compilation_cache as cc
    except ImportError:  # pragma: no cover - layout changed; the setting still applies
        return
    reset = getattr(cc, "reset_cache", None)
    if reset is not None:
        reset()


def enable_compilation_cache(
    directory: str | os.PathLike,
    *,
    min_compile_time_secs: float = 0.0,
    min_entry_size_bytes: int = 0,
) -> Path:
    """Store compiled XLA programs in ``directory`` and reuse them in later processes.

    Args:
      directory: where the cache lives (created if missing). Share it between runs.
      min_compile_time_secs: only cache programs that took at least this long to compile
        (JAX's default is 1 s; 0 caches everything, small networks included).
      min_entry_size_bytes: only cache executables at least this large (0: all).

    Returns:
      The cache directory as an absolute path.

    Sets ``jax_compilation_cache_dir``, ``jax_persistent_cache_min_compile_time_secs``
    and ``jax_persistent_cache_min_entry_size_bytes``; it takes effect for every
    compilation after the call, in this process.
    """
    if isinstance(min_compile_time_secs, bool) or not min_compile_time_secs >= 0:
        raise ValueError(
            f"enable_compilation_cache: min_compile_time_secs must be >= 0, "
            f"got {min_compile_time_secs!r}"
        )
    if isinstance(min_entry_size_bytes, bool) or not min_entry_size_bytes >= 0:
        raise ValueError(
            f"enable_compilation_cache: min_entry_size_bytes must be >= 0, "
            f"got {min_entry_size_bytes!r}"
        )
    path = Path(directory).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"enable_compilation_cache: {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_entry_size_bytes))
    _reset_jax_cache()
    return path


def disable_compilation_cache() -> None:
    """Stop reading and writing the persistent cache in this process."""
    jax.config.update("jax_enable_compilation_cache", False)
    _reset_jax_cache()


def compilation_cache_dir() -> Path | None:
    """The cache directory in use, or ``None`` when the persistent cache is off."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    value = jax.config.jax_compilation_cache_dir
    return Path(value) if value else None


class ProgramCache:
    """In memory: jitted functions (or what holds them) built on objects whose equality
    cannot vouch for what they compute (a network, a loss, an optimizer), cached by those
    objects' *identity* and by hashable ``values``. Holds a reference to each object, so
    an id is never reused while its entry lives; beyond ``size`` entries the oldest goes.
    Used by ``fit``, ``evaluate`` and ``predict`` (internal)."""

    def __init__(self, size: int = 64):
        self.size, self.entries = size, {}

    def get(self, build, *objs, values=()):
        """``build(*objs)``, cached by the identity of ``objs`` and by ``values``."""
        key = (tuple(id(o) for o in objs), values)
        hit = self.entries.get(key)
        if hit is not None:
            return hit[1]
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        made = build(*objs)
        self.entries[key] = (objs, made)
        return made

