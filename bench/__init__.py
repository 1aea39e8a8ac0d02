"""Performance and device tooling, apart from the evaluation protocol in ``eval/``: the efficiency benchmark
(``bench.efficiency``: TTFT / TPOT / FLOPs / KV cache, the roofline model; ``bench.efficiency_official``: our
engine against each method's official approach), the GPU check (``bench.gpu_check``, its fast-path section
``bench.gpu_check.fast``), the DeepSpeed check (``bench.deepspeed_check``) and the tensor-parallel check
(``bench.tp_check``). Each is a ``python -m`` command; ``scripts/bench/*.sh`` wrap them."""
