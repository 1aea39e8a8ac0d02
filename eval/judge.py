"""Pluggable LLM judge for MM-Vet and the video QA benchmarks: any OpenAI-compatible
``/chat/completions`` endpoint (OpenAI, Azure-compatible gateways, vLLM, a local server).

Configured by the user: ``--judge-base-url`` (or ``EVAL_JUDGE_BASE_URL`` / ``OPENAI_BASE_URL``),
``--judge-model`` (or ``EVAL_JUDGE_MODEL``), and the *name* of the environment variable that holds
the API key (``--judge-api-key-env``, default ``OPENAI_API_KEY``; the key itself never goes on the
command line or into results). Uses the ``openai`` package when installed, plain ``urllib``
otherwise. Judgements are cached one file per item under ``<run>/judge/<model>/``, so an
interrupted grading resumes where it stopped (as the official scripts do).
"""

from __future__ import annotations

import ast
import datetime
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import scorers
from .io import read_json, write_json

log = logging.getLogger(__name__)


@dataclass
class JudgeConfig:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 120.0
    retries: int = 5
    workers: int = 4
    backoff: float = 1.0  # seconds, doubled per retry (capped at 30 x backoff)
    force_urllib: bool = False

    @classmethod
    def from_env(cls, base_url: str | None = None, model: str | None = None, api_key_env: str | None = None, **kw):
        base_url = base_url or os.environ.get("EVAL_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        model = model or os.environ.get("EVAL_JUDGE_MODEL")
        if not base_url or not model:
            return None
        return cls(base_url=base_url.rstrip("/"), model=model, api_key_env=api_key_env or "OPENAI_API_KEY", **kw)

    def public(self) -> dict:
        """What goes into results / W&B (no key)."""
        from urllib.parse import urlparse

        u = urlparse(self.base_url)
        return {"model": self.model, "endpoint": f"{u.scheme}://{u.netloc}{u.path}", "api_key_env": self.api_key_env}


class Judge:
    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.api_key = os.environ.get(cfg.api_key_env, "")
        self._client = None
        if not cfg.force_urllib:
            try:
                from openai import OpenAI

                self._client = OpenAI(base_url=cfg.base_url, api_key=self.api_key or "EMPTY", timeout=cfg.timeout,
                                      max_retries=0)
            except ImportError:
                self._client = None
        self.served_models: set[str] = set()

    def chat(self, messages: list[dict], **params) -> str:
        """One chat completion; returns the message content. Retries transport errors."""
        last = None
        for attempt in range(self.cfg.retries):
            try:
                return self._chat_once(messages, **params)
            except Exception as e:  # noqa: BLE001 - network / server errors: retry with backoff
                last = e
                if attempt + 1 < self.cfg.retries:
                    time.sleep(min(2 ** attempt, 30) * self.cfg.backoff)
        raise RuntimeError(f"judge request failed after {self.cfg.retries} attempts: {last}")

    def _chat_once(self, messages, **params) -> str:
        if self._client is not None:
            resp = self._client.chat.completions.create(model=self.cfg.model, messages=messages, **params)
            if getattr(resp, "model", None):
                self.served_models.add(resp.model)
            return resp.choices[0].message.content
        body = json.dumps({"model": self.cfg.model, "messages": messages, **params}).encode()
        req = urllib.request.Request(self.cfg.base_url + "/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        with urllib.request.urlopen(req, timeout=self.cfg.timeout) as r:
            data = json.loads(r.read().decode())
        if data.get("model"):
            self.served_models.add(data["model"])
        return data["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------------------------------
# protocols
# ---------------------------------------------------------------------------------------------


def grade_mmvet(judge: Judge, item: dict) -> dict:
    """MM-Vet grader protocol (one run): temperature 0, max_tokens 3; on an unparseable score,
    re-ask with the 'Predict the correctness' suffix and temperature + 0.5, up to 5 tries, then 0.0."""
    temperature = 0.0
    prompt = scorers.mmvet_grader_prompt(item["question"], item["answer"], item["pred"])
    content = judge.chat([{"role": "user", "content": prompt}], max_tokens=3, temperature=temperature)
    score = scorers.mmvet_parse_score(content)
    tries = 1
    while score is None:
        prompt = scorers.mmvet_grader_prompt(item["question"], item["answer"], item["pred"], retry=True)
        content = judge.chat([{"role": "user", "content": prompt}], max_tokens=3, temperature=temperature)
        tries += 1
        temperature += 0.5
        if tries > 5:  # upstream: the fifth re-ask's reply is not parsed; the grade is 0.0
            score = 0.0
            break
        score = scorers.mmvet_parse_score(content)
    return {"score": score, "content": content, "tries": tries}


def judge_videoqa(judge: Judge, item: dict) -> dict:
    """Video-ChatGPT protocol: system + user message, the reply parsed as a Python dict literal
    with 'pred' (yes/no) and 'score' (0-5). No temperature is sent (the official call leaves the
    API default)."""
    messages = [{"role": "system", "content": scorers.VIDEOQA_SYSTEM},
                {"role": "user", "content": scorers.videoqa_user_prompt(item["question"], item["answer"], item["pred"])}]
    content = judge.chat(messages)
    try:
        parsed = ast.literal_eval(content.strip())
    except (ValueError, SyntaxError):
        m = re.search(r"\{.*\}", content, re.DOTALL)
        if not m:
            raise ValueError(f"judge reply is not a dict: {content!r}") from None
        parsed = ast.literal_eval(m.group(0))
    if not isinstance(parsed, dict):
        raise ValueError(f"judge reply is not a dict: {content!r}")
    return {"pred": parsed.get("pred"), "score": parsed.get("score"), "content": content}


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:80]


def run_judge(bench, records: list[dict], run_dir: Path, cfg: JudgeConfig, strict: bool = True) -> dict:
    """Judge every item (cached per item), then score. Returns the benchmark's judged metrics
    plus judge information for the results file."""
    judge = Judge(cfg)
    items = bench.judge_items(records)
    cache = Path(run_dir) / "judge" / _safe_name(cfg.model)
    cache.mkdir(parents=True, exist_ok=True)
    protocol = grade_mmvet if bench.name == "mmvet" else judge_videoqa
    todo = [k for k in items if not (cache / f"{_safe_name(k)}.json").exists()]
    failures: dict[str, str] = {}

    def work(key):
        # the official scripts retry an item until its reply parses; here up to `retries` times
        for attempt in range(max(1, cfg.retries)):
            try:
                res = protocol(judge, items[key])
                break
            except (ValueError, SyntaxError) as e:  # an unparseable reply: ask again
                failures[key] = f"{type(e).__name__}: {e}"
            except Exception as e:  # noqa: BLE001 - transport failure (already retried): recorded, the others go on
                failures[key] = f"{type(e).__name__}: {e}"
                return
        else:
            return
        failures.pop(key, None)
        write_json(cache / f"{_safe_name(key)}.json", {"key": key, "item": items[key], "result": res})

    if todo:
        from tqdm import tqdm

        with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
            list(tqdm(pool.map(work, todo), total=len(todo), desc=f"judge {bench.name}", mininterval=2))
    results: dict[str, Any] = {}
    for k in items:
        p = cache / f"{_safe_name(k)}.json"
        if p.exists():
            results[k] = read_json(p)["result"]
    if bench.name == "mmvet":
        scored = bench.judged_metrics({k: v["score"] for k, v in results.items()}, strict=strict and not failures)
    else:
        scored = bench.judged_metrics(results, strict=strict)
    date = datetime.date.today().isoformat()
    info = {**cfg.public(), "served_models": sorted(judge.served_models), "date": date, "judged": len(results),
            "items": len(items), "failures": len(failures)}
    if failures:
        info["failure_examples"] = dict(list(failures.items())[:5])
    return {**scored, "judge": info}
