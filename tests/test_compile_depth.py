"""bench.compile_depth times a process from outside: from its spawn to its first tokens, with the phases between
(the interpreter's start, the imports, the model, the inputs, the first generate) adding up to it."""

import pytest

from bench.compile_depth import PHASES, _process


@pytest.mark.timeout(600)
def test_a_process_is_timed_from_its_spawn_and_its_phases_add_up(tmp_path):
    row = _process(2, False, "none", str(tmp_path))  # uncompiled: seconds
    phases = row["phases"]
    assert list(phases) == list(PHASES)
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(row["first_tokens_s"], abs=0.02)
    # the spawn is the process's start: the kernel's start time of the process agrees with the parent's clock
    assert row["age_at_main_s"] is None or abs(row["age_at_main_s"] - phases["start"]) < 0.1
    assert phases["import_llava"] > 0 and phases["first_generate"] > 0
    assert row["first_tokens_s"] <= row["process_s"] + row["second_s"]  # the exit comes after the first tokens
    assert row["path"] == "fast" and row["precompiled"] is None and row["parts"]["fast_load"] is None
