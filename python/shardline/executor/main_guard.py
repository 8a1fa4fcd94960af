"""The multi-process executor's hint for a worker that died while starting: a main
script that starts the engine at import time, with no `if __name__ == "__main__":`.
Its own module, since reading the script's syntax is no part of running workers."""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def main_guard_hint() -> str:
    """Why a worker may have died while starting, where the main script shows it: each
    worker process imports that script again (multiprocessing's spawn), so a script with
    no `if __name__ == "__main__":` anywhere it runs on import starts an engine in every
    worker too, which multiprocessing refuses. Empty where the script has a guard, where
    spawn does not import it again (a package's __main__) or where there is none."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    # A package's __main__ (`python -m package`) is the one script spawn does not import again.
    spec_name = getattr(getattr(main, "__spec__", None), "name", "")
    if not path or f".{spec_name}".endswith(".__main__"):
        return ""
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    if _tests_name_at_import(tree):
        return ""
    return (f"; {path} has no `if __name__ == \"__main__\":` block: every worker process "
            "imports that script again, and the code that made this engine ran in each "
            "worker too. Put that code under such a block (multiprocessing's message is on "
            "stderr above)")


def _tests_name_at_import(tree: ast.Module) -> bool:
    """Whether code the script runs when imported (anything outside a function's body)
    tests `__name__`: a guard in any spelling and place, `if __name__ == "__main__":` at
    the top level or under a try, a with or another if, or `__name__ == "__main__" and
    main()`. A false hint on a guarded script would send its author after the wrong fix."""
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        test = (node.test if isinstance(node, (ast.If, ast.IfExp, ast.While))
                else node.subject if isinstance(node, ast.Match)
                else node if isinstance(node, ast.Compare) else None)
        if test is not None and any(isinstance(name, ast.Name) and name.id == "__name__"
                                    for name in ast.walk(test)):
            return True
        pending.extend(ast.iter_child_nodes(node))
    return False
