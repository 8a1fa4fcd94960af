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
