"""``python -m parity``'s job runner (issue 71, parity/jobs.py): parallel official jobs, a progress line per finished
job, resume, a failing job reported while the others finish; and ``--seeds``' ranges. The official worker here is a
small script standing in for it (it tests the runner, not parity); "the official Python" is this one."""

from __future__ import annotations

import io
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

from parity.__main__ import parse_seeds
from parity.jobs import Job, JobFailed, Runner, failed_check

#: the stand-in worker: ``JOB OUT`` as the official workers take them; logs each run, can wait for its siblings to
#: start (a run N at a time must have them all running at once), fail, or read a file the spec names
WORKER = textwrap.dedent("""
    import json, os, sys, time
    job = json.load(open(sys.argv[1]))
    with open(job["log"], "a") as f:
        f.write(job["id"] + "\\n")
    os.makedirs(job["meet"], exist_ok=True)
    open(os.path.join(job["meet"], job["id"]), "w").close()
    deadline = time.time() + 20
    while len(os.listdir(job["meet"])) < job["wait_for"]:
        if time.time() > deadline:
            sys.exit("never met the other jobs")
        time.sleep(0.02)
    if job.get("fail"):
        sys.exit("boom: " + job["id"])
    data = open(job["input"]).read() if job.get("input") else ""
    json.dump({"id": job["id"], "input": data}, open(sys.argv[2], "w"))
""")


@pytest.fixture
def setup(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(WORKER)
    (tmp_path / "input.txt").write_text("weights v1")

    def job(i: str, wait_for: int = 1, **spec) -> Job:
        spec = {"id": i, "log": str(tmp_path / "runs.log"), "meet": str(tmp_path / f"meet-{wait_for}"),
                "wait_for": wait_for, **spec}
        return Job(f"job-{i}", sys.executable, spec, tmp_path / "work", worker=str(script), outputs=("log", "meet"),
                   suffix=".official.json")

    def runs() -> list[str]:
        log = tmp_path / "runs.log"
        return log.read_text().split() if log.exists() else []

    return job, runs, tmp_path


def test_jobs_run_n_at_a_time_with_a_progress_line_each(setup):
    """Three jobs that each wait until all three have started: they finish only when run three at a time."""
    job, runs, _ = setup
    log = io.StringIO()
    with Runner(jobs=3, log=log) as runner:
        futures = [runner.submit(job(i, wait_for=3)) for i in "abc"]
        assert [f.result()["id"] for f in futures] == ["a", "b", "c"]
    assert sorted(runs()) == ["a", "b", "c"]
    lines = log.getvalue().splitlines()
    assert len(lines) == 3 and all(re.fullmatch(r"\[[123]/3\] job-[abc] \d+\.\d s", ln) for ln in lines), lines
    assert sorted(ln[:5] for ln in lines) == ["[1/3]", "[2/3]", "[3/3]"]


def test_a_finished_job_is_resumed_and_a_changed_input_reruns(setup, monkeypatch):
    job, runs, tmp_path = setup
    Runner().run(job("a", input=str(tmp_path / "input.txt")))
    Runner().run(job("b"))
    assert runs() == ["a", "b"]
    log = io.StringIO()
    runner = Runner(log=log)
    assert runner.run(job("a", input=str(tmp_path / "input.txt")))["input"] == "weights v1"
    assert runner.run(job("b"))["id"] == "b"
    assert runs() == ["a", "b"]  # neither ran again
    assert log.getvalue().splitlines() == ["[1/1] job-a resumed (output and inputs unchanged)",
                                           "[2/2] job-b resumed (output and inputs unchanged)"]
    (tmp_path / "input.txt").write_text("weights v2")  # a file the spec names: its contents are an input
    assert Runner().run(job("a", input=str(tmp_path / "input.txt")))["input"] == "weights v2"
    Runner().run(job("b", extra=1))  # the spec itself
    monkeypatch.setenv("USE_VERSION", "2_0")  # an environment variable an official side reads (parity.jobs.ENVIRON)
    Runner().run(job("b", extra=1))
    Runner(fresh=True).run(job("a", input=str(tmp_path / "input.txt")))  # --fresh
    assert runs() == ["a", "b", "a", "b", "b", "a"]


def test_a_failing_job_is_reported_and_the_others_finish(setup):
    """Two at a time: the failure of b leaves a and c to finish (their outputs and stamps written, resumed next time);
    b leaves no output and no stamp, says why on its progress line, and runs again next time."""
    job, runs, tmp_path = setup
    log = io.StringIO()
    with Runner(jobs=2, log=log) as runner:
        futures = {i: runner.submit(job(i, fail=i == "b")) for i in "abc"}
        with pytest.raises(JobFailed, match="boom: b"):
            futures["b"].result()
        assert futures["a"].result()["id"] == "a" and futures["c"].result()["id"] == "c"
    work = tmp_path / "work"
    assert sorted(p.name for p in work.glob("*.done.json")) == ["job-a.done.json", "job-c.done.json"]
    assert not list(work.glob("job-b.official.json*"))
    assert any(re.fullmatch(r"\[\d/3\] job-b FAILED after \d+\.\d s: boom: b", ln)
               for ln in log.getvalue().splitlines()), log.getvalue()
    with pytest.raises(JobFailed) as err:
        Runner().run(job("b", fail=True))
    assert sorted(runs()) == ["a", "b", "b", "c"]
    check = failed_check("fp16 b", err.value)
    assert (check.group, check.ok, check.detail) == ("official-job", False, "the official worker failed: boom: b")
    for i in "ac":
        Runner().run(job(i, fail=False))
    assert sorted(runs()) == ["a", "b", "b", "c"]  # resumed
    stamp = json.loads((work / "job-a.done.json").read_text())
    assert stamp["fingerprint"] == job("a", fail=False).fingerprint() and stamp["seconds"] >= 0


def test_an_error_cancels_the_jobs_not_started_and_lets_the_running_one_finish(setup):
    """One at a time: a waits for a partner file, b and c queue; an error in our side cancels b and c, and a, let go,
    finishes with its output and stamp (resumed next time)."""
    job, runs, tmp_path = setup
    with pytest.raises(RuntimeError, match="ours failed"):
        with Runner(jobs=1, log=io.StringIO()) as runner:
            first = runner.submit(job("a", wait_for=2))
            for i in "bc":
                runner.submit(job(i))
            (tmp_path / "meet-2").mkdir(exist_ok=True)
            (tmp_path / "meet-2" / "partner").touch()
            raise RuntimeError("ours failed")
    assert first.result()["id"] == "a" and runs() == ["a"]
    assert sorted(p.name for p in (tmp_path / "work").glob("*.done.json")) == ["job-a.done.json"]


def test_a_long_name_gets_a_short_file_name(tmp_path):
    name = "llava15-fp16-none-" + "-".join(f"method{i}8-method{i}16" for i in range(20))
    a, b = (Job(n, "py", {}, tmp_path) for n in (name, name + "x"))
    assert len(a.out.name) < 140 and a.out.name.endswith(".official.pt") and a.out != b.out


@pytest.mark.parametrize("words, seeds", [
    (["0", "4", "5"], [0, 4, 5]),
    (["0-5"], [0, 1, 2, 3, 4, 5]),     # both ends
    (["0:6"], [0, 1, 2, 3, 4, 5]),     # Python's range: the end left out
    (["7", "0-2", "10:12"], [7, 0, 1, 2, 10, 11]),
    (["3-3"], [3]),
])
def test_seeds_take_lists_and_ranges(words, seeds):
    assert parse_seeds(words) == seeds


@pytest.mark.parametrize("words, message", [
    (["3-1"], "'3-1' is an empty range"), (["2:2"], "'2:2' is an empty range"),
    (["1", "0-2"], "names a seed twice: 1"), (["a"], "'a' is not a seed"), (["1-2-3"], "'1-2-3' is not a seed"),
    (["1:"], "'1:' is not a seed"),
])
def test_bad_seeds_are_refused(words, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_seeds(words)


def test_the_cli_refuses_bad_seeds_and_jobs_with_one_error_line(capsys, tmp_path):
    from parity.__main__ import main

    assert main(["llava15", "--seeds", "5-2", "--work", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err == "error: --seeds: '5-2' is an empty range\n"
    assert main(["llava15", "--jobs", "0", "--work", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err == "error: --jobs must be at least 1, not 0\n"
    assert not (tmp_path / "w").exists()


def test_the_parts_start_every_official_worker_through_the_runner():
    """One place starts official processes: parity/jobs.py (the parts build Jobs)."""
    parity = Path(__file__).resolve().parents[1] / "parity"
    starters = sorted(p.name for p in parity.glob("*.py") if "subprocess.run(" in p.read_text()
                      and not p.name.startswith("official_"))
    assert starters == ["jobs.py"]
