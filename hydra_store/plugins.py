"""The `package.module:function` grammar by which users plug in their own data sets and models."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from hydra_store.errors import HydraStoreError

PLUGIN_PATTERN = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
)


def is_plugin_spec(spec: str) -> bool:
    """Whether `spec` has the form `package.module:function`."""
    return bool(PLUGIN_PATTERN.match(spec))


def load_plugin_function(
    spec: str, *, what: str, error: type[HydraStoreError]
) -> Callable[..., Any]:
    """Import `package.module` and return its callable `function`; `error` (naming `what`, e.g.
    'data set' or 'model') if the module cannot be imported or has no such function."""
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise error(
            f"cannot import module {module_name!r} for {what} {spec!r}: {exc} "
            "(is it on PYTHONPATH?)"
        ) from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise error(f"{what} {spec!r}: module {module_name!r} has no function {func_name!r}")
    return func
