"""The paper specs of issues 56 and 85 against the sources they were read from: every published number of
hiprune.toml, divprune.toml and pdrop.toml equals the transcription below (typed from the source independently of
the spec file), and each transcription is checked on its own terms - HiPrune's printed averages recomputed from its
cells, DivPrune's TFLOP ratios from the paper's eq. (5) with the official tflops.py inputs and the differences the
paper's prose quotes, PyramidDrop v2's Avg column, prose and copied baselines; the cells where a spec keeps a
printed number its source contradicts (SparseVLM's FastV SQA, HiPrune's PyramidDrop SQA); DUET-VLM's printed
averages, ApET's and VisionTrim's claims."""

import math

import pytest

from eval.paper_report import report
from eval.papers import load

# --------------------------------------------------------------------------------------------- HiPrune
# Danielement321/danielement321.github.io @ bb26d88, research/hiprune/table_2.png: GQA MMB MMB-CN MME POPE SQA-IMG
# VQAv2 TextVQA VizWiz | Average ("-" = printed as '-')
HIPRUNE_LLAVA = """
- LLaVA-1.5-7B | 61.9 64.7 58.1 1862 85.9 69.5 78.5 58.2 50.0 | 100.0
192 ToMe | 54.3 60.5 - 1563 72.4 65.2 68.0 52.1 - | 88.5
192 FastV | 52.7 61.2 57.0 1612 64.8 67.3 67.1 52.5 50.8 | 90.4
192 HiRED | 58.8 62.6 54.5 1742 83.0 67.9 75.0 - 51.1 | 96.4
192 TRIM | 59.9 64.1 53.6 1765 87.1 67.8 76.2 54.9 50.4 | 97.1
192 PyramidDrop | 57.3 63.3 56.8 1797 82.3 69.0 75.1 56.5 51.1 | 97.2
192 VisionZip | 59.3 63.0 - 1783 85.3 68.9 76.8 57.3 - | 97.7
192 SparseVLM | 59.5 64.1 58.0 1780 85.4 68.8 77.0 57.7 50.6 | 98.6
192 HiPrune | 59.2 62.8 57.0 1814 86.1 68.9 76.7 57.6 54.5 | 99.3
128 ToMe | 52.4 53.3 48.8 1343 62.8 59.6 63.0 49.1 50.2 | 83.0
128 FastV | 49.6 56.1 56.4 1490 59.6 60.2 61.8 50.6 51.3 | 85.4
128 HiRED | 57.1 61.7 53.9 1714 79.8 68.1 73.5 - 51.4 | 95.0
128 TRIM | 58.9 63.3 51.5 1732 87.2 68.4 74.8 52.7 50.6 | 95.7
128 PyramidDrop | 57.1 61.6 56.6 1761 82.3 68.4 72.9 56.6 51.0 | 96.2
128 VisionZip | 57.6 62.0 - 1762 83.2 68.9 75.6 56.8 - | 96.2
128 SparseVLM | 53.8 64.4 58.1 1761 85.0 68.5 76.3 56.7 50.2 | 97.0
128 HiPrune | 57.3 62.2 56.4 1782 82.8 68.3 74.9 56.64 54.3 | 97.5
64 ToMe | 48.6 43.7 38.9 1138 52.5 50.0 57.1 45.3 50.2 | 73.1
64 FastV | 46.1 48.0 52.7 1256 48.0 51.1 55.0 47.8 50.8 | 76.7
64 HiRED | 54.6 60.2 51.3 1595 73.7 68.2 69.8 - 53.3 | 91.8
64 TRIM | 56.9 61.5 44.9 1603 86.7 69.0 71.9 50.0 50.6 | 92.1
64 PyramidDrop | 47.5 58.8 50.5 1561 55.9 69.2 69.2 50.6 50.7 | 86.7
64 VisionZip | 55.1 60.1 - 1690 77.0 69.0 72.4 55.5 - | 92.7
64 SparseVLM | 53.7 60.1 52.5 1559 77.5 69.7 70.2 53.4 50.4 | 91.8
64 HiPrune | 53.6 59.5 53.4 1646 73.0 68.9 69.2 54.9 54.4 | 92.7
"""
# research/hiprune/table_4.png (Qwen2.5-VL-3B-Instruct): MMB MMB-CN POPE SQA-IMG VizWiz | Avg; budget = % retained
HIPRUNE_QWEN = """
- Qwen | 77.3 73.0 87.0 80.4 68.3 | 100
33.3 FastV | 74.4 70.6 85.0 79.3 66.9 | 97.4
33.3 VisionZip | 74.9 69.8 85.4 80.1 67.1 | 97.7
33.3 HiPrune | 75.8 71.3 86.0 80.0 67.5 | 98.6
22.2 FastV | 72.4 69.2 82.7 79.6 66.2 | 95.9
22.2 VisionZip | 73.5 67.4 84.6 80.0 66.3 | 96.2
22.2 HiPrune | 74.0 69.3 84.7 80.3 66.5 | 97.1
11.1 FastV | 56.2 60.7 73.3 79.3 63.8 | 86.4
11.1 VisionZip | 67.8 63.3 80.2 79.5 62.8 | 91.5
11.1 HiPrune | 69.6 65.2 80.4 78.9 64.2 | 92.8
"""


def parse(block):
    out = []
    for ln in block.strip().splitlines():
        head, cells, avg = (x.strip() for x in ln.split("|"))
        budget, name = head.split(" ", 1)
        out.append((budget, name, [None if c == "-" else float(c) for c in cells.split()], float(avg)))
    return out


def check_against(table, transcription, budget_of):
    """Every row of ``table`` in order: the same label (up to the venue / dagger), budget, published cells (a '-'
    cell in ``missing``) and printed average as the transcription."""
    keys = [c.key for c in table.columns]
    rows = parse(transcription)
    assert len(table.rows) == len(rows)
    for r, (budget, name, cells, avg) in zip(table.rows, rows):
        assert r.label.startswith(name), (r.label, name)
        assert r.rel_avg == avg, r.label
        if budget == "-":
            assert r.vanilla
        else:
            assert budget_of(r) == float(budget), r.label
        for k, v in zip(keys, cells):
            if v is None:
                assert k not in r.published and r.missing[k] == "printed as '-'", (r.label, k)
            else:
                assert r.published[k] == v, (r.label, k)


def test_hiprune_llava_table_is_the_page_image():
    t = load("hiprune").table("Project page: LLaVA-1.5-7B")
    check_against(t, HIPRUNE_LLAVA, lambda r: r.paper_budget)
    runnable = {(r.method, r.budget, tuple(sorted(r.options.items()))) for r in t.rows
                if r.runnable and not r.vanilla}
    assert runnable == {(m, b, (("numerics", "official"),)) for m in ("fastv", "pdrop", "visionzip", "sparsevlm",
                                                                      "hiprune") for b in (192, 128, 64)}
    assert {r.label for r in t.rows if r.not_run} == {"ToMe (ICLR'23)", "HiRED† (AAAI'25)", "TRIM† (COLING'25)"}


def test_hiprune_qwen_table_is_the_page_image():
    t = load("hiprune").table("Project page: Qwen2.5-VL-3B")
    assert t.model == "Qwen/Qwen2.5-VL-3B-Instruct" and t.budget_unit == "% of the image's tokens"
    check_against(t, HIPRUNE_QWEN, lambda r: r.paper_budget)
    assert [r.group for r in t.rows[1:4]] == ["Retain 33.3% Tokens"] * 3
    assert [r.runnable for r in t.rows] == [True] + [False] * 9  # only the unpruned row runs here


@pytest.mark.parametrize("block", [HIPRUNE_LLAVA, HIPRUNE_QWEN])
def test_hiprune_transcription_recomputes_the_printed_averages(block):
    """The page's Average = mean over a row's printed cells of cell / vanilla x 100: recomputed from the
    transcribed cells it is within 0.1 of the printed one in every row (the largest gap, 0.09, is PyramidDrop at 64:
    86.61 vs 86.7), so no cell was misread by more than rounding."""
    rows = parse(block)
    van = rows[0][2]
    for budget, name, cells, avg in rows[1:]:
        ratios = [c / v for c, v in zip(cells, van) if c is not None]
        assert abs(100 * sum(ratios) / len(ratios) - avg) < 0.1, (budget, name)


def test_hiprune_report_counts():
    """Nothing run: LLaVA table 9 + 24 x 9 - 11 '-' = 214 published cells, the ToMe (7 + 9 + 9), HiRED (3 x 8) and
    TRIM (3 x 9) rows = 76 of them not runnable here; the Qwen table 5 x 10 = 50, 45 not runnable (its 9 pruned
    rows)."""
    text, info = report(load("hiprune"), [], table="Project page: Qwen2.5-VL-3B")
    # rows not run: one line per reason, naming the rows (three budgets each)
    assert [ln.split(":")[1] for ln in text.splitlines() if ln.startswith("- Not run:")] == [
        f" rows {m} (Retain 33.3% Tokens), {m} (Retain 22.2% Tokens), {m} (Retain 11.1% Tokens)"
        for m in ("FastV", "VisionZip", "HiPrune")]
    _, info = report(load("hiprune"), [])
    lines = {tid: rep.summary_line() for tid, rep in info["tables"].items()}
    assert lines == {
        "Project page: LLaVA-1.5-7B": "0 of 214 published cells reproduced within tolerance, 214 not run (76 cannot "
                                      "be run here)",
        "Project page: Qwen2.5-VL-3B": "0 of 50 published cells reproduced within tolerance, 50 not run (45 cannot be "
                                       "run here)"}


# --------------------------------------------------------------------------------------------- DivPrune
# DivPrune Table 1 (machine-converted copy, read_file id 63504568176): TFLOP ratio | COCO Flickr GQA MMB MME MMMU
# Nocaps OKVQA POPE SQA SEEDB
DIVPRUNE = {
    "Table 1: LLaVA 1.5-7B": """
Original | 100.00 | 1.10 0.75 61.96 64.09 1506 36.44 1.06 53.39 85.84 69.41 66.17
VTW | 18.46 | 0.05 0.03 38.94 21.31 681 32.60 0.03 18.64 25.35 65.29 36.13
FastV | 15.69 | 0.06 0.03 38.73 20.62 696 32.00 0.04 18.32 32.84 65.15 35.69
Ours | 15.63 | 0.96 0.62 56.85 59.19 1328 35.89 0.92 46.98 86.02 68.27 59.47
PruMerge | Variable | 0.77 0.50 51.30 54.47 1259 35.11 0.73 41.74 66.89 68.91 53.26
Ours* | Variable | 0.91 0.56 55.25 58.16 1330 35.44 0.87 44.38 83.06 67.87 57.88
FitPrune | 15.65 | 0.90 0.56 52.39 57.65 1197 36.00 0.86 42.53 60.89 68.02 54.84
M3 | 15.63 | 1.00 0.67 60.81 65.81 1391 31.80 0.95 55.12 86.33 64.65 64.93
PruMerge-LoRA | Variable | 0.96 0.63 55.96 59.88 1334 34.89 0.90 47.99 77.13 68.32 57.93
""",
    "Table 1: LLaVA 1.5-13B": """
Original | 100.00 | 1.16 0.80 63.33 68.64 1522 35.67 1.09 58.28 85.99 72.88 66.82
VTW | 16.16 | 0.08 0.05 39.71 21.91 622 32.10 0.05 22.49 0.40 66.24 38.59
FastV | 15.73 | 0.38 0.18 44.98 37.80 942 35.11 0.33 32.14 30.02 69.96 44.95
Ours | 15.71 | 1.00 0.66 57.29 63.40 1407 34.89 0.95 53.29 83.43 72.34 62.04
PruMerge | Variable | 0.80 0.53 52.01 58.93 1256 36.56 0.77 49.15 64.36 72.53 56.10
Ours* | Variable | 0.94 0.59 56.09 61.77 1344 34.89 0.91 50.86 79.60 71.34 60.00
""",
    "Table 1: LLaVA 1.6-7B": """
Original | 100.00 | 1.00 0.68 64.28 67.01 1520 36.44 0.88 44.20 86.38 70.15 70.16
VTW | 11.23 | 0.06 0.03 38.62 19.76 606 31.30 0.03 8.66 7.13 65.74 37.48
FastV | 11.30 | 0.06 0.03 38.79 20.36 619 32.56 0.04 8.80 7.78 65.49 37.62
Ours | 10.79 | 0.89 0.61 58.69 63.49 1362 37.11 0.76 41.92 82.97 68.57 64.11
M3 | 10.79 | 1.01 0.67 62.97 69.16 1490 35.00 0.85 57.49 87.44 69.51 68.49
""",
}


def divprune_rows(tid):
    out = {}
    for ln in DIVPRUNE[tid].strip().splitlines():
        name, ratio, cells = (x.strip() for x in ln.split("|"))
        out[name] = (ratio, [float(c) for c in cells.split()])
    return out


@pytest.mark.parametrize("tid", list(DIVPRUNE))
def test_divprune_table_is_the_transcription(tid):
    t = load("divprune").table(tid)
    assert t.budget_unit == "% TFLOP" and all(c.lmms_task for c in t.columns)
    rows = divprune_rows(tid)
    assert len(t.rows) == len(rows)
    for r, (name, (ratio, cells)) in zip(t.rows, rows.items()):
        assert r.label.startswith(name) or (name == "Ours" and r.label == "Ours (DivPrune)"), (r.label, name)
        assert r.paper_budget == (ratio if ratio == "Variable" else float(ratio)), r.label
        assert [r.published[c.key] for c in t.columns] == cells, r.label
        assert r.unverified  # a converted copy, not the paper
    ours = next(r for r in t.rows if r.label == "Ours (DivPrune)")
    assert ours.method == "divprune" and ours.budget is None
    assert ours.options == {"ratio": 0.098, "numerics": "official"}
    assert {r.method for r in t.rows if r.runnable} <= {"none", "divprune", "prumerge"}


def tflops(seq, d, m, layers):
    """The paper's eq. (5) per layer, summed: 4 n d^2 + 2 n^2 d + 2 n d m (attention projections, scores, FFN)."""
    return layers * (4 * seq * d * d + 2 * seq * seq * d + 2 * seq * d * m)


# the official tflops.py's inputs (vbdi/divprune @799e2d9): the 11 tasks' text lengths, LLaVA 1.6's visual tokens
# per task
TEXT = [15, 15, 23, 83, 25, 113, 15, 39, 21, 91, 57]
NEXT_VISUAL = [2225, 1922, 2239, 1927, 2108, 1882, 2292, 2249, 2250, 1598, 2116]


def divprune_tflops(visual, d, m, layers, ratio=0.098):
    """(unpruned TFLOPs, pruned TFLOPs, ratio %) averaged over the tasks: DivPrune keeps round(ratio x V) before
    the first layer (the official int(round((1 - r) V)) removed)."""
    full, pruned, ratios = [], [], []
    for t, v in zip(TEXT, visual):
        f = tflops(t + v, d, m, layers)
        p = tflops(t + v - int(round((1 - ratio) * v)), d, m, layers)
        full.append(f)
        pruned.append(p)
        ratios.append(100 * p / f)
    n = len(TEXT)
    return sum(full) / n / 1e12, sum(pruned) / n / 1e12, sum(ratios) / n


def test_divprune_budget_convention_is_the_official_tflop_arithmetic():
    """DivPrune's rows' TFLOP ratio is what eq. (5) gives at SUBSET_RATIO = 0.098 (56 of 576 tokens on LLaVA 1.5):
    7B (d 4096, FFN 11008, 32 layers) 3.228 -> 0.512 = 15.63 %; 13B (5120, 13824, 40) 6.281 -> 1.002 = 15.71 %
    (the TFLOPs as the table prints them, in the spec's notes); LLaVA 1.6-7B 11.849 -> 1.266 = 10.797 %, printed
    10.79."""
    spec = load("divprune")
    for tid, (visual, d, m, layers), (full, pruned) in (
            ("Table 1: LLaVA 1.5-7B", ([576] * 11, 4096, 11008, 32), (3.228, 0.512)),
            ("Table 1: LLaVA 1.5-13B", ([576] * 11, 5120, 13824, 40), (6.281, 1.002)),
            ("Table 1: LLaVA 1.6-7B", (NEXT_VISUAL, 4096, 11008, 32), (11.849, 1.266))):
        f, p, ratio = divprune_tflops(visual, d, m, layers)
        assert (round(f, 3), round(p, 3)) == (full, pruned), tid
        t = spec.table(tid)
        ours = next(r for r in t.rows if r.label == "Ours (DivPrune)")
        assert abs(ratio - ours.paper_budget) < 0.01, (tid, ratio)
        assert f"{full}" in t.notes and f"{pruned}" in t.notes
    assert 576 - int(round((1 - 0.098) * 576)) == 56


def test_divprune_cells_match_the_papers_prose():
    """The differences section 4.3 quotes (in points unless marked %), recomputed from the spec's cells."""
    t7, t13, t16 = (load("divprune").table(f"Table 1: LLaVA {m}") for m in ("1.5-7B", "1.5-13B", "1.6-7B"))

    def cell(t, label, key):
        return next(r for r in t.rows if r.label.startswith(label)).published[key]

    assert round(cell(t7, "Original", "gqa") - cell(t7, "Ours", "gqa"), 1) == 5.1
    assert round(cell(t7, "Original", "mmb") - cell(t7, "Ours", "mmb"), 1) == 4.9
    assert round(cell(t7, "Original", "gqa") - cell(t7, "VTW", "gqa"), 1) == 23.0  # "at least 23.0 ... on GQA"
    assert round(cell(t7, "Original", "mmb") - cell(t7, "VTW", "mmb"), 1) == 42.8  # "... and 42.8 on MMB"
    assert round(100 * (1 - cell(t7, "Ours", "coco") / cell(t7, "Original", "coco")), 1) == 12.7  # COCO CIDEr -12.7 %
    assert cell(t7, "Ours", "pope") > cell(t7, "Original", "pope")  # "slightly enhances ... POPE"
    for key in ("mmmu", "sqa"):  # "less than a 2% performance drop on the MMMU and SQA datasets"
        assert cell(t7, "Original", key) - cell(t7, "Ours", key) < 2
    assert [round(cell(t13, "Ours", "pope") - cell(t13, b, "pope"), 1) for b in ("VTW", "FastV")] == [83.0, 53.4]
    assert round(cell(t13, "Ours*", "pope") - cell(t13, "PruMerge", "pope"), 1) == 15.2
    assert [round(cell(t13, "Ours", "mmb") - cell(t13, b, "mmb"), 1) for b in ("VTW", "FastV")] == [41.5, 25.6]
    assert round(cell(t13, "Ours*", "mmb") - cell(t13, "PruMerge", "mmb"), 1) == 2.8
    assert [round(cell(t16, "Original", k) - cell(t16, "Ours", k), 1) for k in ("pope", "mmb", "okvqa", "sqa")] == \
        [3.4, 3.5, 2.3, 1.6]
    assert cell(t16, "Ours", "mmmu") > cell(t16, "Original", "mmmu")  # "enhances ... on the MMMU task"


def test_divprune_report_counts():
    """Nothing run: 9 x 11 = 99 published cells on 7B, 66 of them in rows not runnable here (VTW, FastV, Ours*,
    FitPrune, M3, PruMerge-LoRA); 13B 66 / 33 (VTW, FastV, Ours*); LLaVA 1.6 55 / 33 (VTW, FastV, M3)."""
    _, info = report(load("divprune"), [])
    assert [rep.summary_line() for rep in info["tables"].values()] == [
        "0 of 99 published cells reproduced within tolerance, 99 not run (66 cannot be run here)",
        "0 of 66 published cells reproduced within tolerance, 66 not run (33 cannot be run here)",
        "0 of 55 published cells reproduced within tolerance, 55 not run (33 cannot be run here)"]


# --------------------------------------------------------------------------------------------- claims-only specs
def test_duet_averages_and_claims():
    """AMD-AGI/DUET-VLM @ cd69e48: README (192: VisionZip 97.7, PyramidDrop 96.4, DUET-VLM 99.0; 64: DUET-VLM 95.4;
    video: PyramidDrop 960 100.7, DUET-VLM 960 100.8 and 136 97.6) and the project page's condensed Table 1 (128:
    96.3 / 95.6 / 98.1; 64: VisionZip 92.8, PyramidDrop 86.7). No per-benchmark cell anywhere."""
    p = load("duet")
    img, vid = p.tables
    assert [(r.method, r.budget, r.rel_avg) for r in img.rows] == [
        ("none", None, 100.0), ("visionzip", 192, 97.7), ("pdrop", 192, 96.4), ("duet", 192, 99.0),
        ("visionzip", 128, 96.3), ("pdrop", 128, 95.6), ("duet", 128, 98.1),
        ("visionzip", 64, 92.8), ("pdrop", 64, 86.7), ("duet", 64, 95.4)]
    assert [(r.method, r.budget, r.paper_budget, r.rel_avg) for r in vid.rows] == [
        ("none", None, 2048, 100.0), ("pdrop", None, 960, 100.7), ("duet", 120, 960, 100.8), ("duet", 17, 136, 97.6)]
    assert sum(len(r.published) for t in p.tables for r in t.rows) == 0
    assert [(c.kind, c.budget, c.at_least) for c in p.claims] == [
        ("retains", 192, 99.0), ("retains", 128, 98.1), ("retains", 64, 95.4), ("retains", 120, 100.8),
        ("retains", 17, 97.6)]
    text, info = report(p, [])
    assert "| DUET-VLM | 192 | – / n/p | – / n/p | – / n/p | – / n/p | – | – | 99.0% | – |" in text
    assert info["claims"][0]["line"].startswith("retains-192: not checked yet")


def test_apet_and_visiontrim_claims():
    """ApET's README TL;DR: 95.2 % at 88.9 % compression (64 of 576); VisionTrim's abstract: superiority, no number."""
    apet = load("apet")
    (claim,) = apet.claims
    assert (claim.kind, claim.method, claim.budget, claim.at_least) == ("retains", "apet", 64, 95.2)
    assert math.isclose(1 - 64 / 576, 0.889, abs_tol=5e-4)
    vt = load("visiontrim")
    (claim,) = vt.claims
    assert (claim.kind, claim.method, claim.against) == ("beats", "visiontrim", ("fastv", "sparsevlm", "pdrop",
                                                                                 "visionzip"))
    assert {(r.method, r.budget) for r in vt.tables[0].rows if not r.vanilla} == {
        (m, b) for m in ("visiontrim", *claim.against) for b in (192, 128, 64)}
    for p in (apet, vt):
        assert sum(len(r.published) for t in p.tables for r in t.rows) == 0


def test_docs_papers_table_matches_the_specs():
    """docs/papers.md's table of specs: one row per spec table, in the specs' order, with its model, its count of
    published cells, its distinct not-run row labels and, for a reference-only table, that status."""
    from pathlib import Path

    from eval.papers import list_papers

    text = (Path(__file__).resolve().parents[1] / "docs" / "papers.md").read_text()
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in text.splitlines() if ln.startswith("| `")]
    want = []
    for k in list_papers():
        for t in load(k).tables:
            want.append([k, t.id, t.model.split("/")[-1], str(sum(len(r.published) for r in t.rows)),
                         str(len({r.label for r in t.rows if not r.runnable})), bool(t.reference_only)])
    got = [[r[0].strip("`"), r[1], r[2], r[3], r[7], "reference only" in r[4]] for r in rows]
    assert got == want


# --------------------------------------------------------------------------------------------- PyramidDrop
# arXiv 2410.17247v2, text conversion of the PDF (GitHub source index, read_file id 60915094325), as printed:
# Table 1 (TFLOPS MME SQAI MMBCN GQA POPE TextVQA SEEDI Avg) and Table 2 (MME MMB SQA GQA TextVQA Average Ratio%)
PDROP_T1 = {
    "Table 1: LLaVA-NeXT-7B": "vanilla 20.8 1534.1 70.4 60.5 64.2 86.1 67.2 71.1 70.9 "
                              "FastV 10.6 1504.0 69.3 60.0 63.5 86.3 66.5 69.3 70.1 "
                              "PDrop 9.5 1533.0 69.4 59.9 63.9 86.4 67.0 70.0 70.5",
    "Table 1: LLaVA-1.5-7B": "vanilla 3.82 1510.7 66.8 58.3 62 85.9 58.2 66.1 67.5 "
                             "FastV 2.01 1473.7 68.5 57.3 59.4 84.0 57.2 64.0 66.4 "
                             "PDrop 1.78 1500.8 69.2 58.5 60.1 84.8 57.6 64.3 67.1",
}
PDROP_T2 = """
LLaVA-1.5-7B 576 1862 64.7 69.5 61.9 58.2 69.4 100%
ToMe 192 1563 60.5 65.2 54.3 52.1 62.0 89.9%
FastV 192 1612 61.2 67.3 52.7 52.5 62.9 90.6%
SparseVLM 192 1721 62.5 69.1 57.6 56.1 66.3 95.5%
PDrop 192 1797 63.3 69.2 57.3 56.5 67.2 96.8%
ToMe 128 1343 53.3 59.6 52.4 49.1 56.3 81.1%
FastV 128 1490 56.1 60.2 49.6 50.6 58.2 83.9%
SparseVLM 128 1696 60.0 67.1 56.0 54.9 64.6 93.0%
PDrop 128 1761 61.6 68.4 57.1 56.6 66.4 95.6%
ToMe 64 1138 43.7 50.0 48.6 45.3 48.9 70.5%
FastV 64 1256 48.0 51.1 46.1 47.8 51.2 73.7%
SparseVLM 64 1505 56.2 62.2 52.7 51.8 59.6 85.9%
PDrop 64 1561 58.8 69.0 47.5 50.6 60.8 87.6%
"""


def _chunks(text, width):
    words = text.split()
    return [words[i:i + width] for i in range(0, len(words), width)]


def test_pdrop_tables_are_v2_as_printed():
    """Every published cell of pdrop.toml is v2's text as printed, decimals included ('62', '1504.0', '60.0')."""
    paper = load("pdrop")
    for tid, line in PDROP_T1.items():
        t = paper.table(tid)
        got = [[r.label] + [r.printed[c.key] for c in t.columns] for r in t.rows]
        assert got == _chunks(line, 10), tid
    t = paper.table("Table 2")
    want = [ln.split() for ln in PDROP_T2.strip().splitlines()]
    got = [[r.label, str(r.paper_budget or 576)] + [r.printed[c.key] for c in t.columns] + [r.rel_avg_printed + "%"]
           for r in t.rows]
    assert got == want


def test_pdrop_v2_checks_itself():
    """v2's Table 1 against its own text and Avg column; Table 2's baselines against SparseVLM's table."""
    paper = load("pdrop")
    for tid in PDROP_T1:
        t = paper.table(tid)
        for r in t.rows:
            p = r.published
            avg = (p["mme"] / 20 + sum(p[k] for k in ("sqa", "mmbcn", "gqa", "pope", "textvqa", "seed"))) / 7
            # vanilla and PDrop to the printed decimal; FastV 0.1 below its printed Avg on both models
            assert round(avg, 1) == pytest.approx(p["avg"] - (0.1 if r.method == "fastv" else 0.0)), (tid, r.label)
    # Section 4.2 on LLaVA-NeXT: PDrop over FastV by 1.5% on MME (MME / 20), 0.4 GQA, 0.5 TextVQA, 0.7 SEED-I
    fastv, pdrop = (r.published for r in paper.table("Table 1: LLaVA-NeXT-7B").rows[1:])
    assert round((pdrop["mme"] - fastv["mme"]) / 20 + 1e-9, 1) == 1.5  # 29.0 / 20 = 1.45, rounded half up
    assert [round(pdrop[k] - fastv[k], 1) for k in ("gqa", "textvqa", "seed")] == [0.4, 0.5, 0.7]
    # Table 2's ToMe / FastV / SparseVLM rows are SparseVLM's Table 1 but for FastV's 64-token SQA (51.1 vs 55.1)
    sv = {(r.label.split(" (")[0], r.paper_budget): r.published for r in load("sparsevlm").table("Table 1").rows}
    diff = []
    for r in paper.table("Table 2").rows:
        if r.vanilla or r.method == "pdrop":
            continue
        other = sv[(r.label, r.paper_budget)]
        diff += [(r.label, r.paper_budget, k, v, other[k]) for k, v in r.published.items()
                 if k != "average" and other[k] != v]
    assert diff == [("FastV", 64, "sqa", 51.1, 55.1)]


# v1's LLaVA-1.5-7B inference-only rows as a third-party transcription gives them (the AI-written review
# deep-diver/ai-paper-reviewer content/paper-reviews/2410.17247/index.md @ 0fd39f4): MME SQAI MMBCN GQA POPE TextVQA,
# and v1's delta row (PDrop - FastV, MME / 20)
PDROP_V1 = {"fastv": [1475.6, 68.5, 56.8, 59.6, 84.8, 57.1], "pdrop": [1500.8, 69.2, 58.5, 60.1, 84.8, 57.5]}
PDROP_V1_DELTA = [1.3, 0.7, 1.7, 0.5, 0.0, 0.4]


def test_pdrop_v1_cells_are_v1_not_typos():
    """The six cells v1's transcription gives differently are v1's own: its delta row is computed from them (and not
    from v2's cells)."""
    keys = ("mme", "sqa", "mmbcn", "gqa", "pope", "textvqa")
    v2 = {r.method: [r.published[k] for k in keys] for r in load("pdrop").table("Table 1: LLaVA-1.5-7B").rows}

    def delta(rows):
        return [round((p - f) / (20 if k == "mme" else 1) + 1e-9, 1) for k, f, p in zip(keys, rows["fastv"],
                                                                                        rows["pdrop"])]
    assert delta(PDROP_V1) == PDROP_V1_DELTA
    assert delta(v2) != PDROP_V1_DELTA  # e.g. MMB-CN 58.5 - 57.3 = 1.2
    changed = [(m, k) for m in PDROP_V1 for k, a, b in zip(keys, PDROP_V1[m], v2[m]) if a != b]
    assert changed == [("fastv", "mme"), ("fastv", "mmbcn"), ("fastv", "gqa"), ("fastv", "pope"), ("fastv", "textvqa"),
                       ("pdrop", "textvqa")]


def test_sparsevlm_fastv_64_sqa_is_printed_55_1_but_the_page_computes_51_1():
    """The page prints FastV's 64-token SQA as 55.1 (kept); its ratio under the cell (73.5%) and the row's Avg.
    (72.1%, the mean of the eight ratios) only work with 51.1."""
    t = load("sparsevlm").table("Table 1")
    van, fastv = t.rows[0].published, next(r for r in t.rows if r.method == "fastv" and r.budget == 64)
    assert fastv.published["sqa"] == 55.1 and fastv.printed["sqa"] == "55.1" and fastv.rel_avg == 72.1
    assert round(100 * 51.1 / van["sqa"], 1) == 73.5 and round(100 * 55.1 / van["sqa"], 1) == 79.3

    def avg(sqa):
        cells = {**fastv.published, "sqa": sqa}
        return round(100 * sum(cells[k] / van[k] for k in van) / len(van), 1)
    assert (avg(51.1), avg(55.1)) == (72.1, 72.8)


def test_hiprune_pdrop_rows_name_their_sources():
    """HiPrune's PyramidDrop rows: GQA / MMB / MME / TextVQA equal PyramidDrop v2's Table 2, SQA only at 128; at 192
    and 64 HiPrune's SQA is PyramidDrop's of the other budget (69.0 / 69.2 against 69.2 / 69.0)."""
    hp = {r.budget: r.published for r in load("hiprune").tables[0].rows if r.method == "pdrop"}
    pd = {r.budget: r.published for r in load("pdrop").table("Table 2").rows if r.method == "pdrop"}
    for b in (192, 128, 64):
        assert [hp[b][k] for k in ("gqa", "mmb", "mme", "textvqa")] == [pd[b][k] for k in ("gqa", "mmb", "mme",
                                                                                           "textvqa")]
    assert [hp[b]["sqa"] for b in (192, 128, 64)] == [69.0, 68.4, 69.2]
    assert [pd[b]["sqa"] for b in (192, 128, 64)] == [69.2, 68.4, 69.0]
