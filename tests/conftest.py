import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# ------------------------------------------------------------------ the fast path's default compile cache folder
# ($XDG_CACHE_HOME/vtprune/compile, else ~/.cache/vtprune/compile: llava.fast.compile.default_cache_dir) in a folder of
# this session, removed at its end, never the user's: XDG_CACHE_HOME is set for the session, its xdist workers and the
# child processes its tests start (the marker keeps the controller's folder in its workers); Hugging Face's and
# torch's caches are first pinned to where they were, so the hub's offline files are still found
if os.environ.get("XDG_CACHE_HOME") != os.environ.get("VTPRUNE_TESTS_CACHE_HOME", "-"):
    import atexit
    import shutil
    import tempfile

    _user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ.setdefault("HF_HOME", os.path.join(_user_cache, "huggingface"))
    os.environ.setdefault("TORCH_HOME", os.path.join(_user_cache, "torch"))
    os.environ["XDG_CACHE_HOME"] = os.environ["VTPRUNE_TESTS_CACHE_HOME"] = tempfile.mkdtemp(prefix="vtprune-tests-")
    atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

# 2 threads (this project's CI machine has 2 cores); under pytest-xdist (scripts/test.sh: one worker per core) the
# cores are shared among the workers
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, 2 // _workers))
# and so do the child processes the tests start (the harness, the scripts, Slurm jobs...): without a thread count
# each took one OpenMP thread per core beside the other workers' (2 workers x 2 threads on 2 cores), and the spinning
# threads cost the subprocess-heavy files about 15 % of their time (20 % more CPU); a count the caller set is kept.
# The xdist controller loads this file first (no worker count: all the cores) and its workers inherit its environment:
# the marker says the count is this file's default, so each worker sets its own share (it kept the controller's 2,
# and a worker's child processes then ran 2 threads beside the other worker: two tests side by side took 4-10x
# their time)
if "OMP_NUM_THREADS" not in os.environ or os.environ.get("VTPRUNE_TESTS_OMP_DEFAULT") == "1":
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // _workers))
    os.environ["VTPRUNE_TESTS_OMP_DEFAULT"] = "1"

#: the official LLaVA environment of the parity tests (scripts/official_env.sh); their opt-in tests skip without it
OFFICIAL_PY = Path(__file__).resolve().parents[1] / ".venv-official" / "bin" / "python"
needs_official = pytest.mark.skipif(not OFFICIAL_PY.exists(),
                                    reason="no .venv-official: run `bash scripts/official_env.sh` (opt-in parity tests)")

import example_methods  # noqa: E402,F401  (registers the test methods)
# the guarantees and their inputs are library code (llava/check/), shared with `python -m llava.check`
from llava.check.guarantees import (check_generate_batch_equals_alone, check_per_unit_tokens,  # noqa: E402,F401
                                    check_reference_mode_in_engine, layout)
from llava.check.inputs import (QUESTIONS, greedy_no_cache, llm_visual_rows, make_batch, rand_image,  # noqa: E402,F401
                                slice_batch)
from llava.engine import HybridRefusal  # noqa: E402
from llava.families import registry  # noqa: E402
from llava.models import load  # noqa: E402

#: every registered family (its tiny spelling): the family-wide tests run on each, so a family added is tested
#: everywhere
ALL_FAMILIES = list(registry.tiny_names())
#: the CLIP-tower families (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA: [CLS] attention, LLaVA's templates)
FAMILIES = [f.tiny for f in registry.families() if f.tower == "clip"]
#: the others (Qwen-VL: M-RoPE, dynamic grids; OneVision: SigLIP, anyres_max_9; InternVL: [CLS] tower, pixel
#: shuffle, dynamic tiles, Qwen3 LLM; Qwen3.5: a hybrid LLM with Gated DeltaNet layers 0 and 2)
NEW_FAMILIES = [f for f in ALL_FAMILIES if f not in FAMILIES]


def skip_hybrid_refusals(rt):
    """On a hybrid model (Qwen3.5) a method whose llm stage reads a linear-attention layer is refused at attach with
    the reason (tests/test_qwen3_5.py checks the refusals); the generic suites skip such a method, naming it."""
    inner = rt.prune

    def prune(*args, **kwargs):
        try:
            return inner(*args, **kwargs)
        except HybridRefusal as e:
            pytest.skip(str(e))

    rt.prune = prune
    return rt


@pytest.fixture(scope="session")
def runtimes():
    return {f: skip_hybrid_refusals(load(f"tiny:{f}", seed=1)) for f in ALL_FAMILIES}


@pytest.fixture
def rt(request, runtimes):
    r = runtimes[request.param]
    yield r
    r.unprune()


# ------------------------------------------------------------------ child processes (scripts, eval run, srun)
RANK_VARS = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def child_env(drop: tuple = (), **set_) -> dict:
    """os.environ for a child process: no launcher or Slurm rank variables inherited (a test run inside a Slurm
    job or under torchrun would make the child a rank of that world), nor any variable starting with one of
    ``drop``; the hub offline, W&B off; then ``set_`` (values as strings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(RANK_VARS + tuple(drop))}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    env.update({k: str(v) for k, v in set_.items()})
    return env


#: the variables of a launcher's world (torchrun / DeepSpeed / srun) in this process's environment
LAUNCH_VARS = RANK_VARS + ("MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _launcher_env_restored():
    """Every test leaves the launcher's variables of this process as it found them. ``eval.dist.init`` exports
    RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* for a world that srun started, as a real rank must; a test that calls
    it (or sets them otherwise) must not hand them to the next test of its worker, whose child process started with
    os.environ would then join a world of two and wait for a rank 0 that never comes (it once stalled the suite
    until CI's time limit)."""
    before = {k: v for k, v in os.environ.items() if k.startswith(LAUNCH_VARS)}
    yield
    for k in [k for k in os.environ if k.startswith(LAUNCH_VARS) and k not in before]:
        del os.environ[k]
    os.environ.update(before)


# ------------------------------------------------------------------ evaluation-harness runs in this process
@pytest.fixture
def run_env(monkeypatch):
    """An `eval run` inside the test process: W&B off, no torchrun variables inherited from outside."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    """POPE and MSVD fixture datasets in their real layouts (eval.fixtures), shared by a test module."""
    from eval.fixtures import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("pope_msvd_data"), ["pope", "msvd"])


@pytest.fixture
def data(fixture_data, tmp_path):
    """A private copy of ``fixture_data`` that a test may damage (modules with their own ``data`` override it)."""
    import shutil
    from pathlib import Path

    return Path(shutil.copytree(fixture_data, tmp_path / "data"))


#: the files that keep one worker longest (a minute or more each on this project's 2-core machine, 2026-11-26), in
#: that order, handed out first: pytest-xdist (>= 3.6) hands the files out by their number of tests, most first,
#: so the long files of a few end-to-end tests (tests/test_slurm.py: five tests, ~3 minutes) came last and one worker
#: ran them alone at the end. Its reordering is turned off (:func:`pytest_configure`) and this order used instead.
SLOW_FILES_FIRST = ("test_slurm.py", "test_slurm_scripts.py", "test_tensor_parallel.py", "test_run_many.py",
                    "test_doc_commands.py", "test_eval_e2e.py", "test_fastpath.py", "test_fastpath_llm.py",
                    "test_gpu_ready.py", "test_fastpath_qwen.py", "test_gpu_check.py", "test_fastpath_baselines.py")


# ------------------------------------------------------------------ the quick tier (`bash scripts/test.sh --quick`)
#: the inner loop's selection, marked ``quick`` (``pytest -m quick``; its time:
#: docs/results/test-suite-timings-cpu.md): every registered method on one family and one method on every family
#: (batch == alone, the unequal-length batch), the generic guarantees' classification and keep-all on that family,
#: the CLI and the documented commands (each page's names checked, the runnable blocks run). Per file: None (every
#: test) or {test function: which of its cases}.
QUICK_FAMILY = "llava"
QUICK_METHOD = "consensusdrop"


def _one_family_or_one_method(params: dict) -> bool:
    """A (method, family) case: QUICK_FAMILY with any method, or QUICK_METHOD on any family."""
    family, method = params.get("rt", params.get("fam")), params.get("method", params.get("name"))
    return family == QUICK_FAMILY or method == QUICK_METHOD


QUICK = {
    "test_cli.py": None,
    "test_doc_commands.py": None,
    "test_gpu_ready.py": {
        "test_every_registered_method_has_a_budget_here": None,
        "test_batch_equals_each_sample_alone": lambda p: p["batch"] == "unequal" and _one_family_or_one_method(p),
    },
    "test_method_guarantees.py": {
        "test_every_registered_method_is_classified_here": None,
        "test_keep_all_is_bit_identical_to_the_unpruned_model": lambda p: p["rt"] == QUICK_FAMILY,
    },
}


def is_quick(item) -> bool:
    """Whether ``item`` is one of :data:`QUICK`'s tests."""
    if item.path.name not in QUICK:
        return False
    tests = QUICK[item.path.name]
    if tests is None:
        return True
    if item.originalname not in tests:
        return False
    which = tests[item.originalname]
    return which is None or which(item.callspec.params if hasattr(item, "callspec") else {})


def pytest_ignore_collect(collection_path, config):
    """``-m quick`` collects only :data:`QUICK`'s files (importing the other test modules took each worker seconds)."""
    if config.getoption("markexpr", "") == "quick" and collection_path.suffix == ".py":
        return collection_path.name.startswith("test_") and collection_path.name not in QUICK or None
    return None


@pytest.hookimpl(tryfirst=True)  # before `-m quick` deselects by the marks
def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if is_quick(item):
            item.add_marker(pytest.mark.quick)
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.6: the files in SLOW_FILES_FIRST's order
        config.option.loadscopereorder = False
