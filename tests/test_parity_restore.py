"""RESTORE against its official repository (cvlab-yonsei/RESTORE, over HoloV, DivPrune and VisPruner):
parity/adapters/restore.py, restore_divprune.py, restore_vispruner.py.

Plain tests (everywhere): our side's options for each base (RESTORE in its reference mode over the base in its own).
Opt-in (``.venv-official`` and the clones ``.official/restore*``: ``bash scripts/official_clones.sh restore
restore_divprune restore_vispruner``): fp32 and fp16 on one build, every check identical - the logits, the base's kept
patches, the LLM row every patch ends in and each visual row's position (docs/results/2026-11-29-restore-parity.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity import adapters, llava15

REPO = Path(__file__).resolve().parents[1]
NAMES = {"restore": "holov", "restore_divprune": "divprune", "restore_vispruner": "vispruner"}


@pytest.mark.parametrize("name,base", NAMES.items())
def test_our_side_is_restore_in_its_reference_mode_over_the_base_in_its_own(name, base):
    ad = adapters.get(name)
    assert ad.BASE == base and ad.OFFICIAL == {"alone": True}  # the official forward_restore serves batch 1
    assert ad.ours(16) == ("restore", {"base": base, "numerics": "official", "base_options": {"numerics": "official"}})


@needs_official
@pytest.mark.parametrize("name", NAMES)
def test_restore_agrees_with_the_official_code(name, tmp_path):
    clone = REPO / ".official" / name
    if not clone.is_dir():
        pytest.skip(f"no clone: run `bash scripts/official_clones.sh {name}`")
    from parity.build import build

    info = build(tmp_path, str(OFFICIAL_PY), seed=0)
    ad = adapters.get(name)
    checks = llava15.run(info, str(OFFICIAL_PY), tmp_path, dtypes=("fp32", "fp16"), budgets=ad.BUDGETS[-1:],
                         methods=(name,), official_path=str(clone))
    bad = [(c.case, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    rows = [c for c in checks if c.group == name]
    assert len(rows) == 8  # 4 images alone x 2 precisions
    assert all([s for s, _ in c.data["official_kept"]] == ["vision", "rows", "positions"] for c in rows)
