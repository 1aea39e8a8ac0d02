"""The efficiency report's figure: one figure holds every registered method, and a figure that fails does not fail
the run (its rows are already in efficiency.json / .md)."""

from pathlib import Path

import pytest

from bench.efficiency.report import LINESTYLES, MARKERS, line_style, plot


def test_line_styles_stay_distinct_past_tab20_and_keep_the_first_twenty():
    colors = [f"c{k}" for k in range(20)]  # tab20's twenty entries, named by index
    styles = [line_style(i, colors) for i in range(80)]
    assert len({(s["color"], s["marker"], s["linestyle"]) for s in styles}) == 80
    # the first ten rows take the dark shades 0, 2, ... 18, the next ten the light ones 1, 3, ... 19, solid lines
    assert [s["color"] for s in styles[:20]] == [f"c{k}" for k in list(range(0, 20, 2)) + list(range(1, 20, 2))]
    assert {s["linestyle"] for s in styles[:20]} == {"-"}
    # the 30th row (index 29), where the old colour index ran past tab20: dark shade 18 (29 % 20 = 9), dashed, marker 9
    assert styles[29] == {"color": "c18", "marker": MARKERS[9], "linestyle": LINESTYLES[1]}


def test_the_figure_holds_every_registered_method(tmp_path):
    pytest.importorskip("matplotlib")
    from llava.method import available_methods

    names = ["none"] + [m for m in available_methods() if m != "none"]
    assert len(names) >= 29
    rows = [{"method": m, "budget": b, "options": {}, "visual_layer_avg": float(b or 576), "ttft": {"median": 0.01},
             "kv_bytes": 2**20 * (b or 576)} for m in names for b in ((None,) if m == "none" else (64, 128))]
    plot({"results": rows, "environment": {"model": "tiny:llava"}}, tmp_path / "efficiency.png")
    assert (tmp_path / "efficiency.png").stat().st_size > 1000


def test_a_failing_figure_does_not_fail_the_run(tmp_path, monkeypatch, capsys):
    import bench.efficiency as eff
    from bench.efficiency import main

    def broken(report, path):
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(eff, "plot", broken)
    monkeypatch.chdir(tmp_path)
    assert main(["--model", "tiny:llava", "--methods", "none", "random", "--budgets", "4", "--n", "1",
                 "--warmup", "0", "--batch", "1", "--decode-tokens", "1", "--decode-samples", "1",
                 "--image-hw", "56", "56", "--sweep", "8", "16"]) == 0
    err = capsys.readouterr().err
    out = Path("runs/efficiency")
    assert "warning: the figure was not written (IndexError: tuple index out of range)" in err
    assert f"wrote {out / 'efficiency.json'}, {out / 'efficiency.md'}, {out / 'cells.jsonl'}" in err
    assert not (out / "efficiency.png").exists() and "| random | 4 |" in (out / "efficiency.md").read_text()
