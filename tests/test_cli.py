"""The CLI answers on the three tiny families at keep-all, 50% and a small budget."""

import json

import pytest
from conftest import FAMILIES, rand_image

from llava.cli import ask, main


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_ask_keep_all_half_and_small(rt):
    per_unit = 17 if rt.family == "video_llava" else 16
    ref = ask(None, "what color is the circle?", method="none", rt=rt, max_new_tokens=5)
    full = ask(None, "what color is the circle?", method="random", budget=10**6, rt=rt, max_new_tokens=5)
    assert full["answer"] == ref["answer"]  # keep-all random is the unpruned model
    assert full["visual_entering_llm"] == ref["visual_candidates"]
    for budget in (per_unit // 2, 2):
        res = ask(None, "what color is the circle?", method="random", budget=budget, rt=rt, max_new_tokens=5)
        units = {"llava": 1, "video_llava": 8}.get(rt.family)
        if units is not None:
            assert res["visual_entering_llm"] == units * budget
        else:  # NeXT 'spatial_unpad': budget per crop plus the kept newline tokens
            assert budget * 3 <= res["visual_entering_llm"] < ref["visual_candidates"]
        assert res["visual_layer_avg"] == res["visual_entering_llm"]
        assert set(res["time_s"]) >= {"vision", "selection", "llm", "generate_total"}


def test_cli_prints_answer_tokens_and_time(tmp_path, capsys):
    """`python -m llava.cli ask ...` in this process (the command as a process of its own, on tiny LLaVA-NeXT: the
    README's runnable block, tests/test_doc_commands.py)."""
    img = tmp_path / "x.png"
    rand_image(3, 60, 90).save(img)
    code = main(["ask", "--model", "tiny:llava-next", "--image", str(img), "--question", "what is this?", "--method",
                 "random", "--budget", "4", "--opt", "seed=3", "--next-layout", "spatial"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "answer:" in out.out and "entering the LLM" in out.out and "time:" in out.out
    # 60x90 (h x w): pinpoint 112x112 keeps 90x60 = 5400 effective pixels vs 84x56 = 4704 for 56x112,
    # so 2x2 grid + base = 5 crops; 'spatial' layout: 5 x 16 candidates, 4 kept per crop
    assert "80 candidates -> 20 entering the LLM" in out.out


def test_cli_errors_are_clear(capsys):
    assert main(["ask", "--question", "q", "--method", "nosuch", "--budget", "3"]) == 2
    assert "known methods" in capsys.readouterr().err
    assert main(["ask", "--question", "q", "--method", "random", "--budget", "0"]) == 2
    assert "budget must be > 0" in capsys.readouterr().err
    assert main(["ask", "--question", "q", "--image", "/no/such.png"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_json_output():
    from io import StringIO
    from contextlib import redirect_stdout

    buf = StringIO()
    with redirect_stdout(buf):
        assert main(["ask", "--question", "what?", "--method", "random", "--budget", "5", "--json"]) == 0
    res = json.loads(buf.getvalue())
    assert res["visual_entering_llm"] == 5 and res["method"]["method"] == "random"


def test_methods_lists_the_fast_path_verdict(capsys):
    """`python -m llava.cli methods`: one line per method, captured or eager with the method's reason."""
    from llava.method import _REGISTRY, available_methods

    assert main(["methods"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(available_methods())
    assert lines["fastervlm"].endswith("fast path: captured")
    assert lines["fastv"].endswith("fast path: captured")
    assert lines["sparsevlm"].endswith("fast path: captured")
    assert lines["trio"].endswith(f"fast path: eager ({_REGISTRY['trio'].capture_reason})")
    assert lines["prumerge"].endswith("fast path: captured piecewise")
