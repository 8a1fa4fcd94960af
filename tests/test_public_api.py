"""The package face: `import shardline` is quiet and light, and every public name says what
it does (a docstring) and what it takes (type hints)."""

import inspect
import subprocess
import sys

import pytest

import shardline

PUBLIC = list(shardline.__all__)


def test_import_prints_nothing_and_loads_no_torch():
    probe = ("import sys, shardline; print(sorted(m for m in ('torch', 'tokenizers', "
             "'shardline.engine') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("[]\n", "")


def _public_members(name: str):
    cls = getattr(shardline, name)
    for attr, member in vars(cls).items():
        if attr.startswith("_") and attr != "__init__":
            continue
        func = member.fget if isinstance(member, property) else getattr(member, "__func__",
                                                                         member)
        if callable(func):
            yield f"{name}.{attr}", func


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names_have_docstrings_and_type_hints(name):
    assert (getattr(shardline, name).__doc__ or "").strip(), name
    undocumented, unhinted = [], []
    for where, func in _public_members(name):
        if where.endswith(".__init__"):
            if func is object.__init__:
                continue
        elif not (func.__doc__ or "").strip():
            undocumented.append(where)
        signature = inspect.signature(func)
        plain = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        if signature.return_annotation is inspect.Signature.empty or any(
                p.annotation is inspect.Parameter.empty for n, p in signature.parameters.items()
                if n not in ("self", "cls") and p.kind not in plain):
            unhinted.append(where)
    assert (undocumented, unhinted) == ([], [])


def test_version_is_the_installed_one_and_optional_from_a_source_tree(monkeypatch):
    """Outside an installed distribution __version__ raised PackageNotFoundError, so even
    getattr(shardline, "__version__", None), as tools ask every module, raised."""
    import importlib.metadata

    monkeypatch.delitem(vars(shardline), "__version__", raising=False)
    assert shardline.__version__ == importlib.metadata.version("shardline")
    assert "__version__" in dir(shardline)
    monkeypatch.delitem(vars(shardline), "__version__")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert getattr(shardline, "__version__", None) is None
    with pytest.raises(AttributeError, match="not installed"):
        shardline.__version__
