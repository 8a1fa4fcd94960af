"""bench/gpu_check.sh's stages (bench/gpu_stages.sh), run on the CPU: a GPU window is
short and rare, so what a cut-off stage leaves behind (its log, its test failures, its
processes) must be right before one comes."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_stages(out: Path, budget: int, script: str, timeout: float = 120) -> str:
    """Source bench/gpu_stages.sh with OUT and BUDGET set, run `script`; stages.txt."""
    env = {**os.environ, "REAP_GRACE_S": "1", "PYTHONPATH": str(REPO / "tests")}
    command = f'OUT={out}; BUDGET={budget}; . bench/gpu_stages.sh\n{script}'
    subprocess.run(["bash", "-c", command], cwd=REPO, env=env, check=True, timeout=timeout,
                   capture_output=True)
    return (out / "stages.txt").read_text()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], check=True)


def test_a_stage_cut_off_keeps_its_log_and_leaves_nothing_running(tmp_path, rng):
    word = f"printed-{rng.randrange(10**9)}"
    stages = run_stages(tmp_path, 100, textwrap.dedent(f"""
        stage escape 2 bash -c "(setsid sleep 300 &); echo {word}; exec sleep 300"
        stage next 5 true
    """))
    assert re.search(r"== escape \(limit 2s\)\n   rc=124 after [23]s\n", stages), stages
    assert word in (tmp_path / "escape.log").read_text()
    # The sleep in its own session escaped timeout's kill; the reaper found it by its mark.
    killed = re.findall(r"killed what the stage left running: ([\d ]+)\n", stages)
    assert len(killed) == 1, stages
    pids = [int(pid) for pid in killed[0].split()]
    assert len(pids) == 1 and not alive(pids[0])
    assert "== next (limit 5s)\n   rc=0" in stages


def test_a_stage_without_time_left_is_skipped(tmp_path):
    stages = run_stages(tmp_path, 22, f"stage first 5 sleep 3\nstage second 5 touch {tmp_path}/ran")
    assert "== second skipped:" in stages and not (tmp_path / "ran").exists()


def test_a_test_stage_names_its_failures_while_it_runs(tmp_path, rng):
    """tests/conftest.py writes each failure to PYTEST_FAILURES_FILE when it happens, so a
    stage stopped before pytest's summary still says what failed and why."""
    message = f"wrong-{rng.randrange(10**9)}"
    (tmp_path / "test_failing.py").write_text(textwrap.dedent(f"""
        import os
        from pathlib import Path

        def test_fails():
            assert 1 == 2, "{message}"

        def test_later_sees_the_failure_on_disk():
            written = Path(os.environ["PYTEST_FAILURES_FILE"]).read_text()
            Path("{tmp_path}/seen").write_text(written)
    """))
    stages = run_stages(tmp_path, 100, f"stage tests 60 {sys.executable} -m pytest -q "
                        f"-p conftest -p no:cacheprovider {tmp_path / 'test_failing.py'}")
    assert "rc=1 " in stages, stages
    seen = (tmp_path / "seen").read_text()
    assert "test_failing.py::test_fails (failed in call" in seen and message in seen
    assert (tmp_path / "failures.txt").read_text() == seen


FAKE_PYTHON = """#!/bin/sh
# Installs nothing, runs nothing: each command line a stage gives python is recorded.
case "$1 $2" in
  "-m pip") exit 0 ;;
  "-c import xdist") exec "{python}" -c "import xdist" ;;
  "-c "*) exit 0 ;;
esac
exec "{python}" -I -c 'import json, sys
open(sys.argv[1], "a").write(json.dumps(sys.argv[2:]) + "\\n")' "{calls}" "$@"
"""

CHECK_COMMANDS = """
import argparse, importlib.util, json, runpy, sys
from pathlib import Path


class Parsed(Exception):
    pass


def parsed(self, args=None, namespace=None):
    real_parse(self, args, namespace)   # argparse exits naming a bad flag or value
    raise Parsed


real_parse, argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_args, parsed
sys.path.insert(0, "bench")
for argv in map(json.loads, Path(sys.argv[1]).read_text().splitlines()):
    if argv[:2] == ["-m", "pytest"]:
        missing = [a for a in argv if "tests/" in a and not Path(a.split("::")[0]).exists()]
        assert not missing, f"pytest {argv[2:]}: no such test paths {missing}"
        for flag, plugin in (("--timeout", "pytest_timeout"), ("-n", "xdist")):
            assert flag not in argv or importlib.util.find_spec(plugin), (flag, plugin)
        continue
    assert argv[0].startswith("bench/") and Path(argv[0]).is_file(), argv
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except Parsed:
        continue
    raise AssertionError(f"{argv[0]} ran without parsing its arguments")
"""


def test_every_stage_command_line_parses(tmp_path):
    """Each stage of bench/gpu_check.sh runs with a stand-in python that only records its
    command line; then every bench script's argparse takes the flags its stage passes and
    every test path a test stage names exists. A flag renamed in a script but not in the
    check (or a test file moved) fails here instead of costing a GPU window."""
    bin_dir, calls, out = tmp_path / "bin", tmp_path / "calls.jsonl", tmp_path / "out"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON.format(python=sys.executable, calls=calls))
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA Fake GPU, 0 MiB'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REAP_GRACE_S": "1",
           "GPU_CHECK_BUDGET": "3600"}
    subprocess.run(["bash", "bench/gpu_check.sh", str(out)], cwd=REPO, env=env, check=True,
                   timeout=120, capture_output=True)
    stages = (out / "stages.txt").read_text()
    names = re.findall(r"^== (\S+) \(limit \d+s\)\n   rc=0 ", stages, re.MULTILINE)
    assert len(names) == stages.count("== ") > 10 and "skipped" not in stages, stages
    # One recorded command line per stage but the install (pip is not recorded).
    assert len(calls.read_text().splitlines()) == len(names) - 1
    done = subprocess.run([sys.executable, "-c", CHECK_COMMANDS, str(calls)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
