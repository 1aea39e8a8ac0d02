"""``python -m llava.check METHOD`` (llava/check/): the guarantees the suite holds the built-in methods to, run on one
method. It passes on a few built-in methods (one family each: CI time; the suite's own generic tests cover them all
through the same library code) and fails, naming the guarantee, on planted methods that break one each: a token
kept twice, a selection that reads a statistic of the whole batch, a Selection built on the host, a selection that
reads the generated text without being query-aware. The command line: the table, exit codes 0 / 1 / 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava.check import run_checks
from llava.check.__main__ import main
from llava.method import Method, register
from llava.selection import Selection

REPO = Path(__file__).resolve().parents[1]


@register
class _KeptTwice(Method):
    """The feature-norm top k with its first token kept a second time."""

    name = "test_chk_kept_twice"
    vision_stage = True
    check_budget = 4  # the checker's budget on every family (a user's class attribute)

    def select_vision(self, sig):
        keep = sig.features.float().norm(dim=-1).topk(min(self.budget, sig.num_tokens)).indices.sort().values
        return Selection(keep=torch.cat([keep, keep[:1]]))


@register
class _BatchMean(Method):
    """In the tower, after layer 0: each unit's ``budget`` tokens farthest from the mean feature norm over every unit
    of the call - all the batch's images at once, so a sample's selection depends on the others."""

    name = "test_chk_batch_mean"
    vision_stage = True
    tower_stage = True
    families = ("llava", "llava_next", "video_llava")

    def select_tower(self, layer_idx, sig):
        if layer_idx != 0:
            return None
        norm = sig.hidden_out.float().norm(dim=-1)
        score = (norm - norm[:, 1:].mean()).abs()
        score[:, 0] = float("inf")  # [CLS] stays
        return score.topk(self.budget + 1, dim=1).indices.sort(dim=1).values

    def select_vision(self, sig):
        return Selection(keep=torch.nonzero(sig.in_tower_kept).flatten())


@register
class _HostBorn(Method):
    """The first ``budget`` tokens, their indices made on the host (``torch.arange`` without ``device=``)."""

    name = "test_chk_host_born"
    vision_stage = True
    check_keep_all = (10**4, {})  # its keep-all spelling (a user's class attribute)

    def select_vision(self, sig):
        return Selection(keep=torch.arange(min(self.budget, sig.num_tokens)))


@register
class _ReadsLastToken(Method):
    """The tokens closest to the prompt's last token (``text_embeds[-1]``) without ``query_aware``: the no-cache
    recompute hands it the generated tokens' text, and it selects again from the last of them."""

    name = "test_chk_reads_last_token"
    vision_stage = True

    def select_vision(self, sig):
        score = sig.features.float() @ sig.text_embeds[-1].float()
        return Selection(keep=score.topk(min(self.budget, sig.num_tokens)).indices.sort().values)


def _rows(rows) -> dict:
    return {(r.guarantee, r.family): (r.verdict, r.detail) for r in rows}


NO_LARGER_INPUT = "has a fixed visual token count per image: no larger input to compare"
NO_LLM_SIGNAL = "reads no LLM signal: the sharded language model is not its concern"


@pytest.mark.parametrize("method,family,only", [
    ("visionzip", "llava-next", None),  # every guarantee (tp: n.a., a pre-LLM method)
    ("consensusdrop", "llava", ["selections", "keep_all", "batch", "cached", "no_mask", "device"]),
    ("dart", "qwen2.5-vl", ["selections", "keep_all", "batch", "cached", "no_mask", "device", "syncs"]),
    ("fastv", "llava", None),  # its llm stage: TP=2 on gloo too
])
def test_the_check_passes_on_built_in_methods(method, family, only):
    rows = _rows(run_checks(method, families=[family], only=only))
    expected = only or ["selections", "keep_all", "batch", "cached", "no_mask", "device", "syncs", "tp"]
    assert [g for g, _ in rows] == expected
    na = {g: d for (g, _), (v, d) in rows.items() if v == "n.a."}
    assert all(v in ("PASS", "n.a.") for v, _ in rows.values()), rows
    if method == "visionzip":
        assert na == {"tp": NO_LLM_SIGNAL}
        assert rows["keep_all", family][1].startswith("budget 576, options {}")  # llava.check.budgets.KEEP_ALL
    elif method == "fastv":
        assert na == {"syncs": f"tiny llava {NO_LARGER_INPUT}"}
        assert rows["tp", family][1].startswith("4 tokens on both ranks")
        assert rows["cached", family][1] == "6 tokens, selections replayed"  # an llm stage reads the last rows
    else:
        assert na == {}


def test_a_token_kept_twice_fails_the_selections_and_the_rest_is_not_run():
    rows = run_checks("test_chk_kept_twice", families=["llava"], only=["selections", "batch", "device"])
    assert [(r.guarantee, r.verdict) for r in rows] == [("selections", "FAIL"), ("batch", "n.a."), ("device", "n.a.")]
    assert rows[0].detail == "ValueError: Selection: a token is kept twice, or a merge target is also kept"
    assert rows[1].detail == rows[2].detail == "not run: the prefill fails (selections)"


def test_a_statistic_of_the_whole_batch_fails_batch_equals_alone_only():
    rows = _rows(run_checks("test_chk_batch_mean", families=["llava"], budget=4, only=["batch", "cached", "no_mask"]))
    assert rows["batch", "llava"][0] == "FAIL" and "alone vs in the batch" in rows["batch", "llava"][1]
    assert rows["cached", "llava"] == ("PASS", "6 tokens, selections recomputed")
    assert rows["no_mask", "llava"][0] == "PASS"


def test_a_selection_made_on_the_host_fails_device_placement_only():
    rows = _rows(run_checks("test_chk_host_born", families=["llava"], budget=4,
                            only=["selections", "keep_all", "device", "fast"]))
    verdict, detail = rows["device", "llava"]
    assert verdict == "FAIL" and detail.startswith("_HostBorn.select_vision at tests/test_check.py:")
    assert "returns Selection.keep created on the host (torch.arange without device=" in detail
    assert rows["selections", "llava"][0] == "PASS"
    assert rows["keep_all", "llava"] == ("PASS", "budget 10000, options {}: logits and 6 tokens bit-identical")
    assert rows["fast", "llava"] == ("n.a.", "test_chk_host_born is not capturable")  # Method.capture_refusal


def test_reading_the_generated_text_fails_cached_equals_recompute_only():
    rows = _rows(run_checks("test_chk_reads_last_token", families=["llava"], budget=4, only=["batch", "cached"]))
    assert rows["batch", "llava"] == ("PASS", "unequal batch; equal_length batch")
    verdict, detail = rows["cached", "llava"]
    assert verdict == "FAIL" and "vs no-cache recompute" in detail and detail.endswith(
        "(recomputed selections: a method reading the text must set query_aware = True)")


def test_the_fast_path_row_compares_a_capturable_method_with_the_eager_engine():
    (row,) = run_checks("visionzip", families=["llava"], budget=4, only=["fast"], fast_backend="none")
    assert (row.verdict, row.detail) == ("PASS", "8 tokens and the first scores == eager (none backend)")


@pytest.mark.parametrize("argv,message", [
    (["fastvv"], "error: unknown method 'fastvv' (did you mean 'fastv'?); `python -m llava.cli methods` lists them"),
    (["fastv", "--families", "lava"], "error: unknown family 'lava' (did you mean 'llava'?); the tiny families: "),
    (["fastv", "--only", "batches"], "error: unknown guarantee 'batches' (did you mean 'batch'?); the guarantees: "),
    (["fastv", "--opt", "ratioo=0.5"], "error: fastv: unknown option(s) ['ratioo'] (did you mean 'ratio'?); known: "),
    (["visionzip", "--budget", "0"], "error: visionzip: budget must be > 0 visual tokens, got 0."),
])
def test_bad_input_is_one_error_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err


def test_the_command_prints_the_table_and_exits_0_when_everything_passes(capsys):
    assert main(["none", "--families", "llava,video-llava", "--only", "selections", "keep_all"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:6] == ["| guarantee | family | result | detail |", "|---|---|---|---|",
                       "| selections | llava | PASS | 48 candidates -> 48 entering the LLM, 48.0 on average over its "
                       "layers (3 samples); sample 0, 1, 2 kept every candidate at this budget |",
                       "| selections | video-llava | PASS | 408 candidates -> 408 entering the LLM, 408.0 on average "
                       "over its layers (3 samples); sample 0, 1, 2 kept every candidate at this budget |",
                       "| keep_all | llava | PASS | budget None, options {}: logits and 6 tokens bit-identical |",
                       "| keep_all | video-llava | PASS | budget None, options {}: logits and 6 tokens bit-identical |"]
    assert out[-1] == "none: 4 PASS, 0 FAIL, 0 n.a."


def test_a_users_method_from_a_file_fails_with_exit_1_naming_the_guarantee(tmp_path):
    """The one command-line run: VTPRUNE_METHODS loads the file, as in every command (llava.cli.load_error)."""
    f = tmp_path / "my_method.py"
    f.write_text("import torch\nfrom llava.method import Method, register\nfrom llava.selection import Selection\n\n\n@register\n"
                 "class Twice(Method):\n    name = 'my_twice'\n    vision_stage = True\n\n"
                 "    def select_vision(self, sig):\n"
                 "        keep = torch.arange(self.budget, device=sig.features.device)\n"
                 "        return Selection(keep=torch.cat([keep, keep[-1:]]))\n")
    env = {**os.environ, "VTPRUNE_METHODS": str(f), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "llava.check", "my_twice", "--budget", "3", "--families", "llava",
                        "--only", "selections", "keep_all"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == [
        "| guarantee | family | result | detail |", "|---|---|---|---|",
        "| selections | llava | FAIL | ValueError: Selection: a token is kept twice, or a merge target is also kept |",
        "| keep_all | llava | n.a. | not run: the prefill fails (selections) |", "",
        "my_twice: 0 PASS, 1 FAIL, 1 n.a.; failing: selections"]
