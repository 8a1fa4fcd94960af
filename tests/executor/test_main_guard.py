"""A script that starts a multi-rank engine at import time, with no `if __name__ ==
"__main__":`: every spawned worker imports it again and fails while starting; the error
says why."""

import importlib.machinery
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import psutil
import pytest

from shardline.executor.main_guard import main_guard_hint
from process_hygiene import leaked_segments, shm_entries

UNGUARDED = 'from shardline import LLM\nllm = LLM("tiny-llama", tensor_parallel_size=2)\n'


@pytest.fixture
def main_script(tmp_path, monkeypatch):
    """Make __main__ a module read from a script with the given text; returns its path."""
    def use(text: str | None):
        path = tmp_path / "script.py"
        main = types.ModuleType("__main__")
        if text is not None:
            path.write_text(text)
            main.__file__ = str(path)
        monkeypatch.setitem(sys.modules, "__main__", main)
        return path
    return use


def test_an_unguarded_script_is_named(main_script):
    path = main_script(UNGUARDED)
    hint = main_guard_hint()
    assert str(path) in hint and 'if __name__ == "__main__":' in hint


@pytest.mark.parametrize("guard", ['if __name__ == "__main__":', "if '__main__' == __name__:",
                                   'if __name__ in ("__main__",):'])
def test_a_guarded_script_gets_no_hint(main_script, guard):
    main_script(f"import sys\n{guard}\n    " + UNGUARDED.replace("\n", "\n    "))
    assert main_guard_hint() == ""


@pytest.mark.parametrize("script", [
    "try:\n    if __name__ == '__main__':\n        {run}\nexcept KeyboardInterrupt:\n    pass\n",
    "import sys\nif sys.version_info < (3, 9):\n    sys.exit(1)\nelse:\n"
    "    if __name__ == '__main__':\n        {run}\n",
    "import contextlib\nwith contextlib.suppress(KeyboardInterrupt):\n"
    "    if __name__ == '__main__':\n        {run}\n",
    "def main():\n    {run}\n\n__name__ == '__main__' and main()\n",
])
def test_a_guard_below_the_top_level_gets_no_hint(main_script, script):
    """The guard still keeps the workers from running the engine's code: no hint."""
    main_script(script.format(run="llm = LLM('tiny-llama', tensor_parallel_size=2)"))
    assert main_guard_hint() == ""


def test_a_guard_inside_a_function_is_no_guard(main_script):
    """Where only a function tests __name__, the script's top level still runs anywhere."""
    path = main_script(UNGUARDED + "def helper():\n    if __name__ == '__main__':\n"
                       "        return 1\n")
    assert str(path) in main_guard_hint()


def test_a_packages_main_run_with_dash_m_gets_no_hint(monkeypatch):
    """`python -m shardline`: its __main__.py has no guard, but spawn never imports a
    package's __main__ again, so a worker that died while starting died of something else."""
    package_main = types.ModuleType("__main__")
    package_main.__spec__ = importlib.util.find_spec("shardline.__main__")
    package_main.__file__ = package_main.__spec__.origin
    monkeypatch.setitem(sys.modules, "__main__", package_main)
    assert "if __name__" not in Path(package_main.__file__).read_text()
    assert main_guard_hint() == ""


def test_a_module_run_with_dash_m_is_imported_again_and_named(main_script):
    path = main_script(UNGUARDED)
    sys.modules["__main__"].__spec__ = importlib.machinery.ModuleSpec("tools.script", None)
    assert str(path) in main_guard_hint()


@pytest.mark.parametrize("case", ["interactive", "does not parse", "gone"])
def test_no_hint_without_a_readable_script(main_script, case):
    path = main_script({"interactive": None, "does not parse": "def broken(:\n",
                        "gone": UNGUARDED}[case])
    if case == "gone":
        path.unlink()
    assert main_guard_hint() == ""


def processes_in(directory: Path) -> list[int]:
    """The live processes whose working directory is `directory`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.cwd() == str(directory) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


def test_the_engines_error_names_the_missing_guard(tmp_path):
    """The failed start leaves no process (its workers ran in the script's directory too)
    and nothing in /dev/shm. Entries that other test runs on this machine make meanwhile
    are not counted: their processes map them (process_hygiene.leaked_segments)."""
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    shm_before = shm_entries()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    assert "while starting" in done.stderr and f"{script} has no `if __name__" in done.stderr
    assert not processes_in(tmp_path), "the failed start left processes running"
    assert not leaked_segments(shm_before, shm_entries), "the failed start left shared memory"
