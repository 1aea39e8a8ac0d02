"""Parity's generated inputs (docs/parity.md, "The weights"): the images and tiny weights of a seed are the same bytes
under any torch thread count and on any CPU, so one seed is one check everywhere. Built in three subprocesses (one
torch thread, two, and one thread on torch's kernels without vector instructions, ``ATEN_CPU_CAPABILITY=default``,
which a CPU without AVX2 runs) and compared by SHA-256, all against digests pinned here (computed once; a CPU, a numpy
or a torch release that drew other values fails them)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from parity.build import Draws, bilinear, image_array, random_state, splitmix64

REPO = Path(__file__).resolve().parents[1]

#: run in a subprocess: every generated input of seed 23 (the seed whose image 3 came out differently under one and
#: two threads when the images were drawn with torch), each as the SHA-256 of its bytes
DIGESTS = r"""
import hashlib, json, sys, tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

torch.set_num_threads(int(sys.argv[1]))
from parity.build import (IMAGE_SIZES, LLM, NEXT_IMAGE_SIZES, NEXT_TOWER, TOWER, Draws, clip_text_shapes,
                          official_shapes, random_state, write_images)
from parity.qwen import METHOD_IMAGE_SIZES, exact_weights
from llava.models import build_tiny

def sha(b):
    return hashlib.sha256(b).hexdigest()

def state(sd):
    return sha(b"".join(k.encode() + sd[k].numpy().tobytes() for k in sorted(sd)))

out, tmp = {}, Path(tempfile.mkdtemp())
for name, sizes in (("images", IMAGE_SIZES), ("images-next", NEXT_IMAGE_SIZES), ("images-methods", METHOD_IMAGE_SIZES)):
    for p in write_images(tmp / name, 23, sizes):
        out[f"{name}/{p.name}"] = sha(np.asarray(Image.open(p)).tobytes())
for tag, tower in (("llava-1.5", TOWER), ("llava-next", NEXT_TOWER)):
    llm, vision = official_shapes(tower, 400, newline=tag == "llava-next")
    out[f"{tag}/tower"] = state(random_state(vision, Draws(tag, 23, "tower"), "tower"))
    out[f"{tag}/clip-text"] = state(random_state(clip_text_shapes(tower), Draws(tag, 23, "clip-text"), "tower"))
    out[f"{tag}/llm"] = state(random_state(llm, Draws(tag, 23, "llm"), "llm"))
for family in ("qwen2.5-vl", "qwen3-vl", "qwen2-vl"):
    model = build_tiny(family, seed=23).model
    exact_weights(model, Draws(family, 23))
    out[family] = state({k: v.contiguous() for k, v in model.state_dict().items()})
print(json.dumps(out))
"""

#: the digests of :data:`DIGESTS` (first 16 hex digits)
PINNED = {
    "images/image0_112x112.png": "c8be57c1c2a2b292",
    "images/image1_160x96.png": "4bcc9b105ca31f95",
    "images/image2_90x140.png": "10106068e28f5941",
    "images/image3_224x200.png": "98140c13c52b42f0",
    "images-next/image0_96x96.png": "4d16a9c89a0a6c1d",
    "images-next/image1_160x96.png": "4bcc9b105ca31f95",
    "images-next/image2_90x140.png": "10106068e28f5941",
    "images-next/image3_176x99.png": "a793d7ff184132a1",
    "images-methods/image0_280x252.png": "07b5817c5571920d",
    "images-methods/image1_364x308.png": "040d5c8cc11541ef",
    "llava-1.5/tower": "fe9d967a1e7982c2",
    "llava-1.5/clip-text": "9d39446792af556e",
    "llava-1.5/llm": "1ab0db1a6c666cc4",
    "llava-next/tower": "cdffcbd94a817059",
    "llava-next/clip-text": "dca82b41e755f339",
    "llava-next/llm": "77375c0febe4a6ad",
    "qwen2.5-vl": "f5551e330a89073f",
    "qwen3-vl": "735606ee5eb44e23",
    "qwen2-vl": "6d4e835e31097efa",
}


def _digests(threads: int, **env_extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **env_extra)
    res = subprocess.run([sys.executable, "-c", DIGESTS, str(threads)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def digests():
    return {1: _digests(1), 2: _digests(2), "default": _digests(1, ATEN_CPU_CAPABILITY="default")}


def test_the_inputs_are_the_same_bytes_under_one_and_two_threads(digests):
    one, two = digests[1], digests[2]
    assert len(one) == 10 + 6 + 3 and one == two  # ten images, six LLaVA state dicts, three Qwen


def test_the_inputs_are_the_same_bytes_on_torchs_kernels_without_vector_instructions(digests):
    # torch.randn itself is not: its DEFAULT kernel draws other values than its AVX2 / AVX512 ones
    assert digests["default"] == digests[1]


def test_the_inputs_are_the_bytes_pinned_here(digests):
    assert {k: v[:16] for k, v in digests[1].items()} == PINNED


def test_splitmix64_gives_the_published_sequence():
    # SplitMix64 from state 0 (the reference sequence of Steele, Lea and Flood's generator)
    assert [int(x) for x in splitmix64(0, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert int(splitmix64(1234567, 1)[0]) == 6457827717110365317


def test_draws_are_keyed_by_name_and_exact():
    d = Draws("k", 0)
    # one draw's values do not depend on what was drawn before it, nor on how many are asked for
    assert np.array_equal(d.normal("a", (5,)), Draws("k", 0).normal("a", (9,))[:5])
    assert not np.array_equal(d.normal("a", (5,)), d.normal("b", (5,)))
    assert not np.array_equal(d.normal("a", (5,)), Draws("k", 1).normal("a", (5,)))
    u = d.uniform("u", (4,))
    assert np.array_equal(u * 2.0 ** 32, np.floor(u * 2.0 ** 32)) and (u >= 0).all() and (u < 1).all()
    # the normal values: (sum of twelve 32-bit integers - 6 * 2**32) / 2**32, so multiples of 2**-32 in (-6, 6)
    z = d.normal("z", (120_000,))
    assert np.array_equal(z * 2.0 ** 32, np.floor(z * 2.0 ** 32)) and np.abs(z).max() < 6
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01  # Irwin-Hall: mean 0, variance 12 / 12 = 1


def test_bilinear_follows_interpolates_half_pixel_rule():
    # worked: [0, 1] to 4 samples; the source coordinates (x + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25
    assert bilinear(np.array([[[0.0, 1.0]]]), 1, 4).tolist() == [[[0.0, 0.25, 0.75, 1.0]]]
    c = np.random.RandomState(0).rand(3, 6, 6)
    ref = torch.nn.functional.interpolate(torch.from_numpy(c)[None], size=(37, 53), mode="bilinear",
                                          align_corners=False)[0].numpy()
    assert np.abs(bilinear(c, 37, 53) - ref).max() < 1e-12


def test_images_and_weights_follow_their_rules():
    img = image_array(23, 3, 224, 200)
    assert img.shape == (200, 224, 3) and img.dtype == np.uint8 and img.std() > 20
    assert not np.array_equal(img, image_array(24, 3, 224, 200))
    sd = random_state({"model.layers.0.self_attn.q_proj.weight": (64, 64), "model.norm.weight": (64,),
                       "model.layers.0.mlp.up_proj.bias": (128,)}, Draws("k", 0), "llm")
    assert all(torch.equal(v, v.half().float()) for v in sd.values())  # fp16-representable
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    assert abs(float(q.std()) - 1.5 / 8) < 0.01  # gain 1.5 / sqrt(fan_in 64)
    assert abs(float(sd["model.norm.weight"].mean()) - 1) < 0.05
