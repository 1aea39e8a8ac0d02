"""bench.plan_time: the fast path's host plan per prefill on a model built on the meta device (nothing runs): a row
per method with the part before the tower and the rest, a refused method's reason, a bad budget's error."""

from bench.plan_time import main


def test_a_row_per_method_with_its_two_parts_a_refusal_and_an_error(capsys):
    assert main(["--model", "tiny:llava", "--methods", "none", "trio", "consensusdrop", "--budget", "24", "--n",
                 "2", "--warmup", "1"]) == 0
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
            for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and not r.startswith("| Method")}
    assert list(rows) == ["none", "trio", "consensusdrop"]
    for m in ("none", "consensusdrop"):
        exposed, beside, total, first = map(float, rows[m])
        assert exposed > 0 and beside > 0 and abs(exposed + beside - total) <= 0.016 and first > 0
    assert rows["trio"][0].startswith("eager: trio:")  # its backward pass is not captured: the eager engine
    assert main(["--model", "tiny:llava", "--methods", "trio", "--budget", "4", "--n", "1", "--warmup", "0"]) == 0
    assert "| trio | error: trio: budget 4 is below" in capsys.readouterr().out
