"""Inductor's CPU vector-ISA check with its verdicts kept on disk (llava.fast.compile.vec_isa): a verdict is read only
under the key it was made under, a changed key (the code, the flags, the CPU, torch's install, an Inductor C++ option)
checks again, a damaged file is checked again and rewritten, and a fresh process that reads every verdict chooses
what Inductor's own check chooses."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llava.fast import compile as fast_compile
from llava.fast.compile import cached_check, vec_isa_key


class FakeISA:
    """What the key reads of one of Inductor's ISA objects."""

    def __init__(self, flags="-mavx2 -mfma", name="avx2"):
        self.flags, self.name = flags, name

    def build_arch_flags(self):
        return self.flags

    def build_macro(self):
        return ["CPU_CAPABILITY_AVX2"]

    def __str__(self):
        return self.name


class Check:
    """Inductor's check_build stand-in: counts its calls, answers ``ok``."""

    def __init__(self, ok=True):
        self.ok, self.calls = ok, 0

    def __call__(self, isa, code):
        self.calls += 1
        return self.ok


def test_a_verdict_is_made_once_then_read(tmp_path):
    check, isa = Check(True), FakeISA()
    assert cached_check(check, isa, "code", str(tmp_path)) is True
    assert check.calls == 1 and len(os.listdir(tmp_path)) == 1
    assert cached_check(check, isa, "code", str(tmp_path)) is True
    assert check.calls == 1  # read, not checked
    no = Check(False)  # a failed check is kept too (another set's program that does not build)
    assert cached_check(no, FakeISA("-mavx512bf16", "avx512"), "code", str(tmp_path)) is False
    assert cached_check(no, FakeISA("-mavx512bf16", "avx512"), "code", str(tmp_path)) is False
    assert no.calls == 1


@pytest.mark.parametrize("change", ["code", "flags", "cpu", "torch", "cpp_option", "library_path"])
def test_a_changed_key_checks_again(change, tmp_path, monkeypatch):
    check, isa, code = Check(True), FakeISA(), "code"
    key = vec_isa_key(isa, code)
    cached_check(check, isa, code, str(tmp_path))
    if change == "code":
        code = "other code"
    elif change == "flags":
        isa = FakeISA("-mavx2 -mfma -mf16c")
    elif change == "cpu":
        monkeypatch.setattr(fast_compile, "_machine", lambda: ["x86_64", "linux", "flags", "sse2"])
    elif change == "torch":
        monkeypatch.setattr(fast_compile, "_torch_library", lambda: ["elsewhere", "2.99", None, []])
    elif change == "cpp_option":
        monkeypatch.setattr(torch._inductor.config.cpp, "enable_unsafe_math_opt_flag", True)
    elif change == "library_path":
        monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/other/lib")
    assert vec_isa_key(isa, code) != key
    cached_check(check, isa, code, str(tmp_path))
    assert check.calls == 2
    assert len(os.listdir(tmp_path)) == 2


def test_a_damaged_verdict_is_checked_again_and_rewritten(tmp_path):
    check, isa = Check(True), FakeISA()
    cached_check(check, isa, "code", str(tmp_path))
    (path,) = tmp_path.iterdir()
    path.write_text('{"ok": ')  # a cut write
    assert cached_check(check, isa, "code", str(tmp_path)) is True
    assert check.calls == 2
    assert json.loads(path.read_text())["ok"] is True
    path.write_text('{"ok": "yes"}')  # not a verdict
    assert cached_check(check, isa, "code", str(tmp_path)) is True
    assert check.calls == 3


def test_without_a_key_the_check_runs_as_it_is_and_nothing_is_kept(tmp_path, monkeypatch):
    def broken(*a):
        raise AttributeError("an Inductor whose internals moved")

    monkeypatch.setattr(fast_compile, "vec_isa_key", broken)
    check = Check(True)
    assert cached_check(check, FakeISA(), "code", str(tmp_path)) is True
    assert cached_check(check, FakeISA(), "code", str(tmp_path)) is True
    assert check.calls == 2 and not os.listdir(tmp_path)


_PROCESS = textwrap.dedent("""
    import json, sys
    import torch._inductor.cpu_vec_isa as m
    if sys.argv[1] == "plain":  # Inductor's own choice, nothing kept
        chosen = m.pick_vec_isa()
        stats = None
    else:
        from llava.fast.compile import vec_isa, vec_isa_stats
        chosen = vec_isa(sys.argv[2])
        stats = vec_isa_stats
    valid = m.valid_vec_isa_list()
    print(json.dumps({"chosen": str(chosen), "flags": chosen.build_arch_flags() if chosen else None,
                      "valid": [[str(i), i.build_arch_flags()] for i in valid], "stats": stats}))
""")


def _run(*args):
    r = subprocess.run([sys.executable, "-c", _PROCESS, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_fresh_process_reads_every_verdict_and_chooses_as_inductor_does(tmp_path):
    first = _run("kept", str(tmp_path))
    if not first["valid"]:  # no vector set on this CPU: nothing to check
        pytest.skip("this CPU offers Inductor no vector instruction set")
    assert first["stats"]["checked"] > 0 and first["stats"]["read"] == 0
    assert os.listdir(tmp_path / "vec_isa")
    second = _run("kept", str(tmp_path))
    assert second["stats"]["checked"] == 0 and second["stats"]["read"] == first["stats"]["checked"]
    plain = _run("plain")
    for row in (first, second):  # the same set, its flags (AVX-512's BF16 part) and the same list as Inductor's
        assert (row["chosen"], row["flags"], row["valid"]) == (plain["chosen"], plain["flags"], plain["valid"])


def test_a_cpu_inductor_fast_path_uses_it_and_the_others_do_not(tmp_path, monkeypatch):
    from llava.fast import path as fast_path
    from llava.models import load

    calls = []
    monkeypatch.setattr(fast_path, "vec_isa", lambda *a: calls.append(a))
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:  # the fast path points Inductor's cache at its folder: restored after
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ["TORCHINDUCTOR_CACHE_DIR"])
    else:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    load("tiny:llava", fast=True, fast_backend="inductor", fast_cache=str(tmp_path))
    assert len(calls) == 1
    load("tiny:llava", fast=True, fast_backend="aot_eager", fast_cache=str(tmp_path))
    load("tiny:llava", fast=True, fast_backend="none")
    assert len(calls) == 1
