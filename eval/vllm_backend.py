"""``eval run --backend vllm`` (``BACKEND=vllm bash scripts/eval/<bench>.sh``): the questions answered by vLLM
with the vtprune plugin (:mod:`integrations.vllm`) instead of the HF engine: the same prompts (our template,
tokenised as the HF backend tokenises them), the same images (LLaVA's pad-to-square unless ``--no-pad``,
then the checkpoint's image processor), the same answer records, shard files, resume and scorers.

vLLM batches the requests of one ``generate`` call itself: ``--batch-size`` is the number of questions
handed to it per call (answers are written after each call). One process; vLLM places the model on the
visible GPU(s) itself. Runs in the environment ``scripts/vllm_env.sh`` builds.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("eval")



def served_families() -> tuple[str, ...]:
    """The families the plugin serves: those of its model classes (integrations.vllm.ARCHITECTURES)."""
    from integrations.vllm import ARCHITECTURES
    from llava.families import registry

    return tuple(f.id for f in registry.families() if f.model_class in ARCHITECTURES)


def _video_benchmark(cfg) -> bool:
    from .benchmarks import BENCHMARKS

    return getattr(BENCHMARKS.get(str(cfg.benchmark).lower().replace("-", "_")), "modality", None) == "video"


def check(cfg, world: int) -> str | None:
    """What ``--backend vllm`` cannot run, as one error line (None: it can), before anything loads."""
    if cfg.model.startswith(("tiny:", "shape:")):
        return ("--backend vllm loads a checkpoint folder or hub id (vLLM reads the weights itself); tiny: / shape: "
                "models exist only in memory (integrations.vllm.tiny.save_tiny_llava writes one vLLM can load)")
    if cfg.fast:
        return "--fast is the HF engine's fast path; with --backend vllm, vLLM runs the decoder"
    if world > 1:
        return ("--backend vllm runs in one process (vLLM places the model on the visible GPUs itself): run it with "
                "NPROC=1 / LAUNCHER=python")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return ("--backend vllm needs vLLM and the vtprune plugin: build the environment with `bash scripts/vllm_env.sh` "
                "and run with .venv-vllm/bin/python (PYTHON=.venv-vllm/bin/python for the scripts)")
    return None


class VllmBackend:
    """One vLLM engine with the run's method; :meth:`answer` a list of questions."""

    def __init__(self, cfg, rt, dtype: str):
        import torch
        from vllm import LLM, SamplingParams

        from integrations.vllm import overrides
        from integrations.vllm.spec import PruneSpec, planned_for_config
        from integrations.vllm.twin import VIDEO_FAMILIES  # the others' videos: the HF backend

        from llava.families import registry

        served = served_families()
        if rt.family not in served:
            raise ValueError(f"--backend vllm serves {', '.join(served)} models so far, not {rt.family}")
        rec = registry.get(rt.family)
        self.video = _video_benchmark(cfg)
        if self.video and rt.family not in VIDEO_FAMILIES:
            raise ValueError(f"--backend vllm answers video questions with {', '.join(VIDEO_FAMILIES)} models so far "
                             f"({rt.family} videos: the HF backend)")
        ov = overrides(cfg.model, cfg.method, cfg.budget, template=cfg.template, revision=cfg.revision, **cfg.options)
        self.spec = spec = PruneSpec.from_dict(ov["vtprune"])
        self.structure = self.planned = None
        if rec.layout == "single":  # one structure for every image
            self.structure, self.planned = planned_for_config(spec, rt.family, rt.model.config)
        self.layers = int(rt.model.config.text_config.num_hidden_layers)
        self.rt = rt
        self.record = rec
        self.cfg = cfg
        # one image, or on a video benchmark one video, per prompt (vLLM reserves memory for what is allowed)
        self.llm = LLM(model=cfg.model, revision=cfg.revision, dtype=dtype, hf_overrides=ov, seed=cfg.seed,
                       limit_mm_per_prompt={"image": 1, "video": 1 if self.video else 0},
                       enforce_eager=not torch.cuda.is_available())
        self.sampling = SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens, seed=cfg.seed)
        import vllm

        self.info = {"name": "vllm", "version": vllm.__version__,
                     "planned_tokens_per_image": self.planned if self.planned is not None else "per image size",
                     "tokens_per_image": self.structure.tokens if self.structure is not None else "per image size"}
        if self.video:
            self.info["planned_tokens_per_video"] = (
                "per frame count" if rec.video == "per_frame" else
                "per video grid (temporal slices x resized frame size)" + (
                    ", laid out per temporal slice after its timestamp" if rec.video == "qwen3" else ""))

    def counts(self, image) -> tuple[int, int]:
        """(the image's tokens unpruned, after the method) as vLLM lays it out."""
        if self.structure is not None:
            return self.structure.tokens, self.planned
        from integrations.vllm.twin import twin_for

        return twin_for(self.cfg.model, self.spec, revision=self.cfg.revision).count(image.width, image.height)

    def prompt(self, q, image=None, video=None) -> tuple[dict, tuple[int, int] | None]:
        """A request and its visual item's (tokens unpruned, planned) (None without one): the HF backend's prompt ids
        (our processor and template) with the image's (video's) placeholder run collapsed to one token (vLLM expands
        it to the method's count), and the image (LLaVA-1.5: padded to a square with the processor's mean colour, as
        LLaVA and our processor do, unless --no-pad) or the video's frames as our processor reads them, with their
        timing (:func:`integrations.vllm.inputs.video_data`)."""
        from integrations.vllm.inputs import collapse, video_data
        from llava.preprocess import CLIP_MEAN, expand2square

        proc = self.rt.processor
        if video is not None:
            enc = proc([q.text], videos=[video])
            cfg = self.rt.model.config  # Qwen3-VL: a timestamp and a marked run per temporal slice, all collapsed
            markers = ((cfg.vision_start_token_id, cfg.vision_end_token_id) if self.record.video == "qwen3"
                       else None)
            ids = collapse(enc["input_ids"][0].tolist(), int(cfg.video_token_id), markers)
            counts = self.video_counts(enc)
            return {"prompt_token_ids": ids, "multi_modal_data": {"video": video_data(video, proc.num_frames)},
                    "mm_processor_kwargs": {"vtprune_sample_key": q.uid}}, counts
        enc = proc([q.text], images=[image])
        ids = enc["input_ids"][0].tolist()
        if image is None:
            return {"prompt_token_ids": ids}, None
        ids = collapse(ids, int(self.rt.model.config.image_token_id))
        if self.record.layout == "single" and proc.pad_to_square:
            bg = tuple(int(x * 255) for x in getattr(proc.image_processor, "image_mean", CLIP_MEAN))
            image = expand2square(image, bg)
        # the HF backend keys seeded draws by the question id (engine.sample_keys): so does the plugin
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": image},
                "mm_processor_kwargs": {"vtprune_sample_key": q.uid}}, self.counts(image)

    def video_counts(self, enc) -> tuple[int, int]:
        """(a video's tokens unpruned, after the method) as vLLM lays it out, from our processor's output for it: its
        key (Qwen2.5-VL / Qwen3-VL: the patch grid; OneVision: the frame count) counted on the geometry twin."""
        from integrations.vllm.twin import twin_for

        twin = twin_for(self.cfg.model, self.spec, revision=self.cfg.revision)
        return twin.video_count(*twin.video_key(enc))

    def answer(self, requests: list[dict]) -> tuple[list[list[int]], float]:
        t0 = time.perf_counter()
        outs = self.llm.generate(requests, self.sampling, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - t0


def infer(cfg, bench, backend: VllmBackend, todo, run_dir, info, qhashes):
    """Answer ``todo`` with vLLM, ``cfg.batch_size`` questions per generate call, each call's answers appended to
    this rank's shard file (the same records as the HF backend; ``_eval.path`` = "vllm")."""
    import torch
    from tqdm import tqdm

    from llava.preprocess import load_image

    from .benchmarks.videoqa import load_video
    from .fingerprint import InputHasher
    from .io import JsonlAppender
    from .shards import EVAL_KEY, read_input

    shard = run_dir / "answers" / f"{info.world}_{info.rank}.jsonl"
    hasher = InputHasher(bench.root)
    model_id = cfg.model.rstrip("/").split("/")[-1]
    size = max(1, cfg.batch_size)
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
    answered = 0
    with JsonlAppender(shard) as out:
        tty = sys.stderr.isatty()
        for chunk in tqdm(chunks, desc=f"{bench.name} vllm", mininterval=5 if tty else 60, dynamic_ncols=tty):
            if any(q.modality == "video" for q in chunk) and not backend.video:
                raise ValueError(f"{bench.name}: video questions on a backend built for images")
            hashes = [hasher.inputs(q) for q in chunk]
            reqs, counts = [], []
            for q in chunk:
                img = vid = None
                if q.modality == "image":
                    img = read_input(q, lambda q=q: load_image(q.load_image()), "image", answered, shard)
                elif q.modality == "video":  # the frames the HF backend reads (eval.loader.prepare)
                    vid = read_input(q, lambda q=q: load_video(q.video, backend.rt.processor.num_frames), "video",
                                     answered, shard)
                req, c = backend.prompt(q, img, vid)
                reqs.append(req)
                counts.append(c)
            tokens, secs = backend.answer(reqs)
            texts = [backend.rt.processor.decode(torch.tensor([t], dtype=torch.long))[0] for t in tokens]  # as the HF path
            recs = []
            for q, text, toks, h, c in zip(chunk, texts, tokens, hashes, counts):
                rec = bench.record(q, bench.postprocess(text), model_id)
                meta = {"uid": q.uid, "idx": q.idx, "qhash": qhashes.get(q.uid), "inputs": h, "rank": info.rank,
                        "batch": len(chunk), "new_tokens": len(toks), "time": {"generate": secs / len(chunk)},
                        "path": "vllm"}
                if c is not None:
                    t, k = c
                    meta.update(visual_candidates=t, visual_entering_llm=k, visual_layer_avg=float(k),
                                visual_per_layer=[k] * backend.layers, vision_noop=k >= t)
                rec[EVAL_KEY] = meta
                recs.append(rec)
            out.write(recs)
            out.flush()
            answered += len(chunk)
            log.debug("vllm: %d answers in %.2fs", len(chunk), secs)
