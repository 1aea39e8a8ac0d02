"""The contract check of a pruning method (docs/check.md): the guarantees the test suite holds the built-in methods
to, as library code that the suite and ``python -m llava.check METHOD`` share.

- :mod:`.guarantees`: one function per guarantee (selections valid, keep-all == unpruned, batch == alone, cached ==
  no-cache recompute, the no-mask forward == generate, host syncs bounded); :mod:`.placement`: the device-placement
  checker (a fake accelerator on the CPU); :mod:`.fast`: fast path == eager; :mod:`.tp`: TP = 2 on gloo;
- :mod:`.inputs`: the tiny models' batches and the no-cache recompute; :mod:`.budgets`: the built-in methods' budgets
  and keep-all spellings on the tiny models;
- :mod:`.runner`: every guarantee on every tiny family of one method, as rows (guarantee, family, PASS / FAIL /
  n.a., detail); ``__main__``: the command line.
"""

from .runner import GUARANTEES, CheckInputError, Row, run_checks, summary, table

__all__ = ["GUARANTEES", "CheckInputError", "Row", "run_checks", "summary", "table"]
