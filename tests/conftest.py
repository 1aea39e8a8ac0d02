import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# 2 threads (this project's CI machine has 2 cores); under pytest-xdist (scripts/test.sh: one worker per core) the
# cores are shared among the workers
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, 2 // _workers))

#: the official LLaVA environment of the parity tests (scripts/official_env.sh); their opt-in tests skip without it
OFFICIAL_PY = Path(__file__).resolve().parents[1] / ".venv-official" / "bin" / "python"
needs_official = pytest.mark.skipif(not OFFICIAL_PY.exists(),
                                    reason="no .venv-official: run `bash scripts/official_env.sh` (opt-in parity tests)")

import example_methods  # noqa: E402,F401  (registers the test methods)
from llava.method import Method, Selection  # noqa: E402
from llava.engine import HybridRefusal  # noqa: E402
from llava.models import load  # noqa: E402

FAMILIES = ["llava", "llava-next", "video-llava"]
#: the families of the adapter split (Qwen2.5-VL: M-RoPE, dynamic grids; OneVision: SigLIP, anyres_max_9;
#: Qwen3-VL: Qwen2.5-VL's geometry plus DeepStack; InternVL: [CLS] tower, pixel shuffle, dynamic tiles, Qwen3 LLM;
#: Qwen3.5: Qwen3-VL's geometry without DeepStack, a hybrid LLM with Gated DeltaNet layers 0 and 2)
NEW_FAMILIES = ["qwen2.5-vl", "llava-onevision", "qwen3-vl", "internvl", "qwen3.5"]
ALL_FAMILIES = FAMILIES + NEW_FAMILIES


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


def rand_image(seed: int, h: int = 40, w: int = 70) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def runtimes():
    return {f: skip_hybrid_refusals(load(f"tiny:{f}", seed=1)) for f in ALL_FAMILIES}


@pytest.fixture
def rt(request, runtimes):
    r = runtimes[request.param]
    yield r
    r.unprune()


QUESTIONS = ["what is this?", "what color is the circle on the left?", "how many objects are there in the picture?"]


def make_batch(rt, n=3, sizes=((40, 70), (56, 56), (90, 30))):
    """n samples with different prompts and images (or videos); left-padded."""
    qs = QUESTIONS[:n]
    if rt.family == "video_llava":
        vids = [[rand_image(10 * i + j, 50, 50) for j in range(8)] for i in range(n)]
        return rt.processor(qs, videos=vids)
    imgs = [rand_image(i, *sizes[i % len(sizes)]) for i in range(n)]
    return rt.processor(qs, imgs)


def slice_batch(inputs, i, rt):
    """Sample i of a batch built by make_batch, without its padding."""
    m = inputs["attention_mask"][i].bool()
    out = {"input_ids": inputs["input_ids"][i][m][None], "attention_mask": inputs["attention_mask"][i][m][None]}
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][i][m][None]
    if "image_grid_thw" in inputs:  # Qwen: pixel rows are patches of all images, grid by grid (one image per sample)
        rows = inputs["image_grid_thw"].prod(-1)
        a = int(rows[:i].sum())
        out["pixel_values"] = inputs["pixel_values"][a:a + int(rows[i])]
        out["image_grid_thw"] = inputs["image_grid_thw"][i:i + 1]
        return out
    if rt.family == "internvl":  # pixel rows are the tiles of all images in prompt order
        per_tile = rt.model.config.image_seq_length
        tiles = [int((inputs["input_ids"][j] == rt.model.config.image_token_id).sum()) // per_tile
                 for j in range(inputs["input_ids"].shape[0])]
        a = sum(tiles[:i])
        out["pixel_values"] = inputs["pixel_values"][a:a + tiles[i]]
        return out
    if "batch_num_images" in inputs:
        out["batch_num_images"] = inputs["batch_num_images"][i:i + 1]
    if "pixel_values_videos" in inputs:
        out["pixel_values_videos"] = inputs["pixel_values_videos"][i:i + 1]
    if "pixel_values" in inputs:
        out["pixel_values"] = inputs["pixel_values"][i:i + 1]
    if "image_sizes" in inputs:
        out["image_sizes"] = inputs["image_sizes"][i:i + 1]
    return out


def greedy_no_cache(model, inputs, steps):
    """Greedy decoding by full recompute every step (use_cache=False), positions as generate builds
    them, end-of-sequence suppressed as ``min_new_tokens=steps`` does: the reference that cached
    generation must equal (with ``engine.replay`` for query-aware methods)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    mrope = "mm_token_type_ids" in extra  # Qwen: 3-D positions from the model's get_rope_index (pass none)
    for _ in range(steps):
        pos = None if mrope else (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **extra).logits
        last = logits[:, -1]
        eos = model.generation_config.eos_token_id
        if eos is not None:  # as generate(min_new_tokens=steps) does: no end of sequence before the last step
            last = last.clone()
            last[:, torch.as_tensor(eos).reshape(-1)] = float("-inf")
        nxt = last.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        if mrope:  # generated tokens are text (type 0)
            extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
    return ids


def check_generate_batch_equals_alone(rt, method, budget=None, **options):
    """``generate()`` on :func:`make_batch` (3 samples, left-padded) with ``method`` attached: each sample's
    new tokens equal those of the sample generated alone (greedy, the engine tests' GEN settings)."""
    from test_engine import GEN

    inputs = make_batch(rt)
    rt.prune(method, budget, **options)
    with torch.no_grad():
        batch = rt.model.generate(**inputs, **GEN)
    new = batch[:, inputs["input_ids"].shape[1]:]
    assert new.shape == (3, GEN["max_new_tokens"])
    for i in range(3):
        one = slice_batch(inputs, i, rt)
        with torch.no_grad():
            toks = rt.model.generate(**one, **GEN)
        assert torch.equal(toks[0, one["input_ids"].shape[1]:], new[i])


def check_reference_mode_in_engine(rt, method, budget, stage):
    """A method's ``numerics="official"`` mode on a tiny model: cached generation of a batch of 3 equals
    the no-cache recompute, and each sample's selection at ``stage`` ("vision" or an llm stage index)
    alone equals its selection in the batch."""
    inputs = make_batch(rt)
    eng = rt.prune(method, budget, numerics="official")
    with torch.no_grad():
        cached = rt.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    batch_sel = {k: v.keep.clone() for k, v in eng.selections.items()}
    eng.replay = True
    assert torch.equal(cached, greedy_no_cache(rt.model, inputs, 3))
    for i in range(3):
        eng = rt.prune(method, budget, numerics="official")
        with torch.no_grad():
            rt.model(**slice_batch(inputs, i, rt))
        assert torch.equal(eng.selections[(stage, 0)].keep, batch_sel[(stage, i)])


def llm_visual_rows(rt, inputs):
    """Per sample, the visual rows of the sequence entering decoder layer 0 (captured there)."""
    cap = {}
    hook = rt.model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: cap.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            rt.model(**inputs)
    finally:
        hook.remove()
    vis_ids = torch.tensor([rt.model.config.image_token_id, getattr(rt.model.config, "video_token_id", -1)])
    rows = []
    for b in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        pos = torch.nonzero(torch.isin(ids, vis_ids)).flatten()
        before, after = int(pos[0]), ids.numel() - int(pos[-1]) - 1
        new = cap["inputs_embeds"][b][cap["attention_mask"][b].bool()]
        rows.append(new[before:new.shape[0] - after])
    return rows


class _Layout(Method):
    """Records each sample's stock tokens per unit and its newline count; keeps everything."""

    name = "layout_spy"
    vision_stage = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def select_vision(self, sig):
        self.seen.append(([int((sig.unit == u).sum()) for u in range(sig.num_units)], int(sig.is_newline.sum())))
        return Selection(keep=torch.arange(sig.num_tokens))


def layout(rt, inputs):
    spy = _Layout()
    rt.prune(spy)
    with torch.no_grad():
        rt.model(**inputs)
    rt.unprune()
    return spy.seen


def check_per_unit_tokens(rt, method, budget, **options):
    """A pre-LLM method with ``budget`` tokens per image / crop / frame on :func:`make_batch`: every sample
    has min(budget, n) tokens of each unit of n candidates plus its newline tokens (kept as layout) in every
    LLM layer, and all its candidates counted. Returns [(stats, unit sizes, newlines)] per sample, for the
    caller's own checks (e.g. ``vision_noop``)."""
    inputs = make_batch(rt)
    lay = layout(rt, inputs)
    if rt.family == "llava":  # the tiny families' layouts (unit sizes, newlines) per sample
        assert lay == [([16], 0)] * 3
    if rt.family == "video_llava":
        assert lay == [([17] * 8, 0)] * 3
    if rt.family == "llava_next":  # 3 crops each (unpadded to 16 / 8 patches), 4 / 4 / 8 newline tokens
        assert lay == [([16, 16, 16], 4), ([16, 8, 8], 4), ([16, 8, 8], 8)]
    eng = rt.prune(method, budget, **options)
    with torch.no_grad():
        rt.model(**inputs)
    L = len(rt.model.model.language_model.layers)
    for s, (sizes, newlines) in zip(eng.stats.samples, lay, strict=True):
        exp = sum(min(budget, n) for n in sizes) + newlines
        assert s.visual_candidates == sum(sizes) + newlines
        assert s.visual_per_layer == [exp] * L and s.visual_entering_llm == exp
    return [(s, sizes, newlines) for s, (sizes, newlines) in zip(eng.stats.samples, lay)]


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
