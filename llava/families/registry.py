"""The model families, one record each: what loading, the engine, the harness, the benchmarks and the methods know
of a family, in one place (as vLLM's model registry and transformers' auto mappings). Code asks the record ("does
this tower have a [CLS]?", "does its processor read videos?"), never a list of family names; a family added with
:func:`register_family` is known everywhere at once.

    from llava.families import registry
    registry.get("qwen2_5_vl").qwen_grid        # True: smart resize, grid_thw, M-RoPE
    registry.get("qwen2.5-vl") is registry.get("qwen2_5_vl")   # the tiny spelling names the same record
    [f.id for f in registry.families() if f.tower == "clip"]   # LLaVA-1.5, NeXT, Video-LLaVA
    registry.where(tower="clip")                # the same, live: a family registered later is in it

A record names its adapter (:mod:`llava.families.base`), its tiny config (:mod:`llava.families.tiny`), its
image processors (:mod:`llava.families.images`), its prompt processor (a kind of
``llava.preprocess.PROCESSORS``, or a class) and its default template (:mod:`llava.conversation`), and carries
its traits as typed fields.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from .. import plugins
from . import images, tiny
from .base import FamilyAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_5 import Qwen3_5Adapter
from .qwen3_vl import Qwen3VLAdapter
from .video_llava import VideoLlavaAdapter

#: the tower kinds (``Family.tower``)
TOWERS = ("clip", "siglip", "qwen", "internvit")
#: how one image is laid out in visual tokens (``Family.layout``)
LAYOUTS = ("single", "anyres", "anyres_max", "tiles", "grid")
#: how a family's processor reads a video (``Family.video``); "" = images only
VIDEOS = ("", "frames", "qwen2", "qwen3", "per_frame")
#: the token geometries of the tiny models (``Family.tiny_geometry``): tables of tiny-model budgets and sizes are keyed
#: by them
TINY_GEOMETRIES = ("image", "crops", "frames", "grid", "anyres_max")


@dataclass(frozen=True)
class Family:
    """One model family.

    Identity and building:
      ``id``: the family key (``rt.family``, ``Method.setup(family=...)``, per-family tables); ``tiny``: its spelling in
      ``tiny:<name>``; ``name``: its name in prose and tables; ``model_class``: the transformers class it serves
      (found by class name; ``model_type``: the class itself where transformers has no attribute of that name,
      e.g. a user's subclass); ``adapter``: its :class:`~llava.families.base.FamilyAdapter`; ``template``: the
      default conversation template; ``processor``: the prompt processor, a class name of ``llava.preprocess.PROCESSORS``
      or the class itself; ``image_processors``: :class:`~llava.families.images.ImageProcessors`; ``tiny_config``:
      (tiny tokenizer) -> the tiny model's config; ``tiny_tokenizer``: the flags of
      :func:`llava.tiny_tokenizer.build_tiny_tokenizer` (``chatml``, ``internvl``, ``think``); ``token_ids``: the
      config's placeholder ids, (config attribute, tiny-tokenizer token) pairs, set on a ``shape:`` model.

    Traits:
      ``chat``: "llava" (LLaVA's conversation templates, ``<image>`` spliced) or "chatml" (the checkpoint's own
      ChatML processor: no pad-to-square, no NeXT layouts); ``qwen_grid``: Qwen-VL's pixels and prompts (smart
      resize within min / max pixels, ``grid_thw``, merged 2x2 tokens, M-RoPE); ``tower`` (:data:`TOWERS`) and
      ``has_cls`` (the tower emits a [CLS] row); ``layout`` (:data:`LAYOUTS`): how one image becomes visual tokens;
      ``video`` (:data:`VIDEOS`): how its processor reads videos ("qwen2" / "qwen3": the Qwen video rules of
      llava.preprocess_qwen_video; "per_frame": a tile / crop per frame; "frames": Video-LLaVA's video tower);
      ``video_model``: a video model (its synthetic inputs
      are videos: Video-LLaVA); ``video_seconds``: its M-RoPE time axis reads ``second_per_grid_ts``;
      ``deepstack``: the LLM adds per-token rows of the tower after its first layers (Qwen3-VL); ``hybrid``: some
      decoder layers have no attention (Qwen3.5's Gated DeltaNet);
      ``budget_unit``: what a visual-token budget counts (results.json); ``fast`` / ``fast_reason``: the fast path
      plans it (or why not); ``tp`` / ``tp_reason``: ``bench.tp_check`` checks it by default (or why not);
      ``tiny_geometry`` (:data:`TINY_GEOMETRIES`): the token geometry of its tiny model (16 tokens per image, per
      crop / tile, 17 per frame, a Qwen grid of 4-35 merged tokens, OneVision's crops and newlines), the key of the
      tables of tiny-model budgets (llava.check.budgets, bench.gpu_check). What the
      vLLM plugin serves is the plugin's own list of model classes (integrations.vllm.ARCHITECTURES).
      ``pre_tower`` / ``pre_tower_reason``: a pre-tower stage (``Method.select_pixels``) runs on its images, the tower
      on the kept tokens' patches only, each with its own position (or why not).
    """

    id: str
    tiny: str
    name: str
    model_class: str
    adapter: type[FamilyAdapter]
    template: str
    tiny_config: Callable
    image_processors: images.ImageProcessors
    budget_unit: str
    processor: object = "PromptProcessor"
    tiny_tokenizer: tuple[str, ...] = ()
    token_ids: tuple[tuple[str, str], ...] = (("image_token_id", "<image>"),)
    model_type: type | None = None
    chat: str = "llava"
    qwen_grid: bool = False
    tower: str = "clip"
    has_cls: bool = True
    layout: str = "single"
    video: str = ""
    video_model: bool = False
    video_seconds: bool = False
    deepstack: bool = False
    hybrid: bool = False
    fast: bool = True
    fast_reason: str = ""
    tp: bool = True
    tp_reason: str = ""
    tiny_geometry: str = "image"
    pre_tower: bool = False
    pre_tower_reason: str = ("its tower runs whole fixed-size inputs: a learned position table over every patch of "
                             "its square grid, attention over all of them")

    def __post_init__(self):
        for name, allowed in (("tower", TOWERS), ("layout", LAYOUTS), ("video", VIDEOS), ("chat", ("llava", "chatml")),
                              ("tiny_geometry", TINY_GEOMETRIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"family {self.id!r}: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.fast and not self.fast_reason:
            raise ValueError(f"family {self.id!r}: fast=False needs a fast_reason")
        if not self.tp and not self.tp_reason:
            raise ValueError(f"family {self.id!r}: tp=False needs a tp_reason")

    @property
    def chatml(self) -> bool:
        return self.chat == "chatml"

    @property
    def mrope(self) -> bool:
        """Kept tokens keep their positions (M-RoPE ids; the adapter's ``keeps_positions``)."""
        return self.adapter.keeps_positions

    def model_cls(self):
        """The transformers class (``model_type``, else transformers' attribute ``model_class``)."""
        if self.model_type is not None:
            return self.model_type
        import transformers

        return getattr(transformers, self.model_class)


_FAMILIES: dict[str, Family] = {}
#: the model commands and configs default to (seconds to build, on a CPU)
DEFAULT_MODEL = "tiny:llava"


def clash(family: Family) -> tuple[str, Family] | None:
    """(what is taken: "id", "tiny name" or "model class", the registered family that has it) where ``family``
    cannot be registered beside the registered families; None where it can."""
    for f in _FAMILIES.values():
        taken = {"id": f.id == family.id, "tiny name": family.tiny in (f.id, f.tiny),
                 "model class": f.model_class == family.model_class}
        for what, hit in taken.items():
            if hit:
                return what, f
    return None


def register_family(family: Family, replace: bool = False) -> Family:
    """Add ``family`` (its id, tiny spelling and model class all unused, unless ``replace``); it is then loaded by
    ``load("tiny:<tiny>")`` / a checkpoint of its model class, and known to every check that asks the registry. An
    installed package registers its family through an entry point of ``vtprune.families`` (llava/plugins.py)."""
    hit = None if replace else clash(family)
    if hit is not None:
        raise ValueError(f"family {family.id!r}: its {hit[0]} is taken by {hit[1].id!r} (replace=True to replace)")
    _FAMILIES[family.id] = family
    return family


#: the id of each family an entry point registered -> that entry point (llava/plugins.py)
_SOURCES: dict[str, str] = {}


def _register_entry_point(record, where: str) -> None:
    """Register the record an entry point of ``vtprune.families`` names (``where``: that entry point), called by
    :func:`llava.plugins.load_user_families`: a :class:`Family` whose id, tiny name and model class no family has
    (a shipped family's: refused with what to change; another entry point's: refused naming it)."""
    if not isinstance(record, Family):
        raise TypeError(plugins.not_a_family(record))
    if _FAMILIES.get(record.id) is record:  # registered at an earlier load in this process
        return
    hit = clash(record)
    if hit is not None:
        what, old = hit
        if old.id in BUILT_IN:
            fix = ("serve a class of its own (a subclass under another name)" if what == "model class" else
                   f"give the family another {what}")
            by = f"the built-in family {old.id!r} ({old.name}): {fix}"
        else:
            by = f"the family {old.id!r} of {_SOURCES[old.id]}" if old.id in _SOURCES else repr(old.id)
        raise ValueError(f"family {record.id!r}: its {what} is taken by {by}")
    register_family(record)
    _SOURCES[record.id] = where


def _load_user_families() -> None:
    """The user's families, loaded with the methods (llava/plugins.py: the entry points of ``vtprune.families``,
    the modules of ``VTPRUNE_METHODS`` and ``vtprune.methods``), once per process: a lookup that finds no family
    asks for them before it answers None."""
    from ..method import available_methods

    available_methods()


def unregister_family(family_id: str) -> None:
    """Remove a registered family (tests)."""
    del _FAMILIES[family_id]


def families() -> tuple[Family, ...]:
    """Every family, in registration order."""
    return tuple(_FAMILIES.values())


def ids() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def tiny_names() -> tuple[str, ...]:
    """Every family's ``tiny:`` spelling."""
    return tuple(f.tiny for f in _FAMILIES.values())


def _find(name: str) -> Family | None:
    if name in _FAMILIES:
        return _FAMILIES[name]
    return next((f for f in _FAMILIES.values() if f.tiny == name), None)


def find(name: str) -> Family | None:
    """The family of an id or a tiny spelling ('qwen2_5_vl' / 'qwen2.5-vl'), the user's families included; None
    when there is none."""
    f = _find(name)
    if f is None:
        _load_user_families()
        f = _find(name)
    return f


def get(name: str) -> Family:
    """:func:`find`, or ValueError naming the families."""
    f = find(name)
    if f is None:
        raise ValueError(f"unknown model family {name!r}; families: {', '.join(_FAMILIES)}")
    return f


def key(name: str) -> str:
    """The family id of an id or a tiny spelling ('llava-next' -> 'llava_next'); a name of no family is spelled the
    way ids are ('-' and '.' as '_')."""
    f = find(name)
    return f.id if f is not None else name.replace("-", "_").replace(".", "_")


def by_model_class(name: str) -> Family | None:
    """The family serving the transformers class ``name`` (a model's ``type(model).__name__``, a config's
    ``architectures[0]``), the user's families included."""
    f = next((f for f in _FAMILIES.values() if f.model_class == name), None)
    if f is None:
        _load_user_families()
        f = next((f for f in _FAMILIES.values() if f.model_class == name), None)
    return f


class FamilySet:
    """The families whose record has the given traits (any one of ``alternatives``, each a dict of field -> value),
    asked at each use, so a family registered later is in it: for ``family in s``, iteration (ids), ``len`` and
    printing, where a tuple of ids was used (``Method.families``). ``where(a=1) | where(b=2)``: either. Plain data:
    it pickles."""

    def __init__(self, *alternatives: dict):
        self.alternatives = tuple(dict(a) for a in alternatives)

    def _has(self, f: Family) -> bool:
        return any(all(getattr(f, k) == v for k, v in a.items()) for a in self.alternatives)

    def __contains__(self, family) -> bool:
        f = find(family) if isinstance(family, str) else family
        return isinstance(f, Family) and self._has(f)

    def __iter__(self):
        return iter([f.id for f in _FAMILIES.values() if self._has(f)])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __or__(self, other: FamilySet) -> FamilySet:
        return FamilySet(*self.alternatives, *other.alternatives)

    def __eq__(self, other) -> bool:
        if isinstance(other, FamilySet):
            return self.alternatives == other.alternatives
        return tuple(self) == tuple(other) if isinstance(other, (tuple, list)) else NotImplemented

    def __hash__(self):
        return hash(repr(self.alternatives))

    def __repr__(self) -> str:
        text = " or ".join(", ".join(f"{k}={v!r}" for k, v in a.items()) for a in self.alternatives)
        return f"<families {text}: {', '.join(self)}>"


def where(**traits) -> FamilySet:
    """The families whose fields equal ``traits`` (``where(tower="clip")``, ``where(hybrid=False)``)."""
    names = {f.name for f in fields(Family)} | {"chatml", "mrope"}
    bad = sorted(set(traits) - names)
    if bad:
        raise TypeError(f"where(): no family field {bad}")
    return FamilySet(traits)


def markdown_table() -> str:
    """The families as a markdown table (docs/models.md holds it between ``<!-- families -->`` markers; a test
    compares): ``python -c "from llava.families import registry; print(registry.markdown_table())"``."""
    rows = ["| Family | id / `tiny:` | transformers class | tower ([CLS]) | prompts | one image | videos | fast path | "
            "`bench.tp_check` | pre-tower stage | a budget unit counts |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in _FAMILIES.values():
        tower = f"{f.tower} ({'yes' if f.has_cls else 'no'})"
        prompts = "ChatML" + (", Qwen grid" if f.qwen_grid else "") if f.chatml else "LLaVA templates"
        extra = ", ".join(x for x, on in (("DeepStack", f.deepstack), ("hybrid decoder", f.hybrid)) if on)
        video = (f.video or "no") + (" (a video model)" if f.video_model else "")
        rows.append(f"| {f.name} | `{f.id}` / `{f.tiny}` | `{f.model_class}` | {tower} | {prompts} | {f.layout}"
                    f"{'; ' + extra if extra else ''} | {video} | {'yes' if f.fast else 'no: ' + f.fast_reason} | "
                    f"{'yes' if f.tp else 'no: ' + f.tp_reason} | "
                    f"{'images' if f.pre_tower else 'no: ' + f.pre_tower_reason} | {f.budget_unit} |")
    return "\n".join(rows)


_QWEN = dict(template="qwen2_vl", image_processors=images.QWEN, processor="QwenVLProcessor", tiny_tokenizer=("chatml",),
             token_ids=(("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")),
             chat="chatml", qwen_grid=True, tower="qwen", has_cls=False, layout="grid", pre_tower=True)

for _f in (
    Family("llava", "llava", "LLaVA-1.5", "LlavaForConditionalGeneration", LlavaAdapter, "vicuna_v1", tiny.llava,
           images.CLIP, "visual tokens per image (576 for LLaVA-1.5 at 336 px)"),
    Family("llava_next", "llava-next", "LLaVA-NeXT", "LlavaNextForConditionalGeneration", LlavaNextAdapter,
           "vicuna_v1", tiny.llava_next, images.NEXT,
           "visual tokens per crop (anyres: base crop + grid crops, per-unit methods)", layout="anyres",
           tiny_geometry="crops"),
    Family("video_llava", "video-llava", "Video-LLaVA", "VideoLlavaForConditionalGeneration", VideoLlavaAdapter,
           "llava_v1", tiny.video_llava, images.CLIP, "visual tokens per image / video frame",
           token_ids=(("image_token_id", "<image>"), ("video_token_id", "<video>")), video="frames", video_model=True,
           tiny_geometry="frames"),
    Family("qwen2_5_vl", "qwen2.5-vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", Qwen2_5_VLAdapter,
           tiny_config=tiny.qwen2_5_vl,
           budget_unit="merged visual tokens per image after the PatchMerger (dynamic grid: (H/28)*(W/28) after "
                       "smart resize within [min_pixels, max_pixels]; a video: per temporal slice of 2 frames)",
           video="qwen2", video_seconds=True, tiny_geometry="grid", **_QWEN),
    Family("llava_onevision", "llava-onevision", "LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration",
           LlavaOnevisionAdapter, "llava_onevision_hf", tiny.llava_onevision, images.ONEVISION,
           "visual tokens per crop (anyres_max_9: base crop + grid crops, per-unit methods; a video: per "
           "frame, 196 pooled tokens each at 384 px, + one newline per video)",
           processor="OnevisionProcessor", tiny_tokenizer=("chatml",),
           token_ids=(("image_token_id", "<image>"), ("video_token_id", "<video>")), chat="chatml", tower="siglip",
           has_cls=False, layout="anyres_max", video="per_frame", tiny_geometry="anyres_max"),
    Family("qwen3_vl", "qwen3-vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration", Qwen3VLAdapter,
           tiny_config=tiny.qwen3_vl,
           budget_unit="merged visual tokens per image after the merger (dynamic grid: (H/(2p))*(W/(2p)) after smart "
                       "resize, p the patch size; each token's DeepStack rows follow it; a video: per temporal slice "
                       "of 2 frames)",
           video="qwen3", deepstack=True, tiny_geometry="grid", **_QWEN),
    Family("internvl", "internvl", "InternVL", "InternVLForConditionalGeneration", InternVLAdapter, "internvl_hf",
           tiny.internvl, images.INTERNVL,
           "visual tokens per tile (dynamic tiling: up to 12 tiles of 448 px + a thumbnail, 256 tokens each "
           "after the 2x2 pixel shuffle; per-unit methods; a video: per frame, one tile each)",
           processor="InternVLProcessor", tiny_tokenizer=("chatml", "internvl"),
           token_ids=(("image_token_id", "<IMG_CONTEXT>"),), chat="chatml", tower="internvit", layout="tiles",
           video="per_frame", tiny_geometry="crops"),
    Family("qwen3_5", "qwen3.5", "Qwen3.5", "Qwen3_5ForConditionalGeneration", Qwen3_5Adapter,
           tiny_config=tiny.qwen3_5,
           budget_unit="merged visual tokens per image after the merger (dynamic grid as Qwen3-VL; a video: per "
                       "temporal slice of 2 frames; hybrid LLM: in-LLM stages only where they read a full-attention "
                       "layer)",
           video="qwen3", hybrid=True, tiny_geometry="grid", **{**_QWEN, "template": "qwen3_5",
                                                         "tiny_tokenizer": ("chatml", "think")}),
    Family("qwen2_vl", "qwen2-vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", Qwen2VLAdapter,
           tiny_config=tiny.qwen2_vl,
           budget_unit="merged visual tokens per image after the PatchMerger (dynamic grid: (H/28)*(W/28) after "
                       "smart resize within [min_pixels, max_pixels]; a video: per temporal slice of 2 frames)",
           video="qwen2", tp=False, tp_reason="not yet run by bench.tp_check", tiny_geometry="grid", **_QWEN),
):
    register_family(_f)

#: the ids of the families this project ships (a user's family takes none of their ids, tiny names or classes)
BUILT_IN = ids()
plugins.family_registrar(_register_entry_point)
