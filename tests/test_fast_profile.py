"""bench.fast_profile on a CPU (``--device cpu``: the aten ops' own time stands in for the kernels): one prefill and
one decode step per method and path, a row each, the file written; the kinds of a GPU's kernel names and of a CPU's
aten ops; the decode step's arithmetic (generate of 1 + S tokens less generate of 1, over S)."""

import pytest

import bench.fast_profile as fp


def test_a_cpu_profile_has_a_prefill_and_a_decode_row_per_method_and_path(tmp_path):
    out = tmp_path / "prof.md"
    assert fp.main(["--model", "tiny:llava", "--dtype", "float32", "--device", "cpu", "--methods", "none",
                    "--fast-backend", "none", "--decode-steps", "2", "--fast-max-new-tokens", "4",
                    "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| none |")]
    assert [r.split(" | ")[1:3] for r in rows] == [["eager (eager)", "prefill"], ["eager (eager)", "decode step"],
                                                  ["fast (fast)", "prefill"], ["fast (fast)", "decode step"]]
    for r in rows:  # wall, kernels, gaps = wall - kernels, then the four kinds adding up to the kernels
        wall, kernels, gaps, *kinds = (float(x) for x in r.strip("| ").split(" | ")[3:])
        assert gaps == pytest.approx(wall - kernels, abs=0.02) and sum(kinds) == pytest.approx(kernels, abs=0.03)
    assert "Top kernels, none (fast, decode step): " in text and "aten::" in text
    assert fp.main(["--device", "cpu", "--decode-steps", "8", "--fast-max-new-tokens", "8"]) == 2  # 9 slots needed


def test_kernel_kinds():
    assert fp.kind_of("nvjet_sm90_hsh_128x160_64x5_2x1_v_bz_TNT") == "gemm"
    assert fp.kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert fp.kind_of("void at::native::index_elementwise_kernel<128, 4>") == "copies"
    assert fp.kind_of("triton_poi_fused_add_mul_0") == "elementwise / reductions"
    assert fp.kind_of("aten::addmm", fp.CPU_KINDS) == "gemm"
    assert fp.kind_of("aten::_scaled_dot_product_flash_attention_for_cpu", fp.CPU_KINDS) == "attention"
    assert fp.kind_of("aten::index_select", fp.CPU_KINDS) == "copies"
    assert fp.kind_of("aten::mul", fp.CPU_KINDS) == "elementwise / reductions"


def test_a_decode_step_is_the_difference_of_two_generates_over_its_steps(monkeypatch):
    calls = []

    def fake_profile(fn, device, **kw):
        fn()
        n = calls[-1]
        return 10.0 + 4.0 * (n - 1), {"gemm": 3.0 + 2.0 * (n - 1)}, {"k": [3.0 + 2.0 * (n - 1), n]}

    class Model:
        def generate(self, **kw):
            calls.append(kw["max_new_tokens"])

    class RT:
        model = Model()

    monkeypatch.setattr(fp, "profile", fake_profile)
    wall, kinds, top = fp.decode_profile(RT(), {}, None, steps=4)
    assert calls == [1, 5] and wall == 4.0 and kinds == {"gemm": 2.0} and top == [("k", 2.0, 1.0)]
