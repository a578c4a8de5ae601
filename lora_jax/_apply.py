"""lora_apply: run any function of a parameter tree with adapted weights."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ._tree import merge


def lora_apply(fn: Callable, *, argnum: int = 0, materialize: bool = False, strict: bool = False):
    """Turn ``fn(params, *args)`` into ``fn(frozen, trainable, *args)``."""

    @functools.wraps(fn)
    def wrapped(frozen: Any, trainable: Any, *args: Any, rng=None, **kwargs: Any):
        params = merge(frozen, trainable)
        args = list(args)
        args.insert(argnum, params)
        return fn(*args, **kwargs)

    return wrapped
