"""The analytic cost each evaluated sample records (llava.cost.sample_cost: results.json's ``prefill_tflops`` and
``kv_mb``), on a worked example."""

from types import SimpleNamespace

from llava.cost import sample_cost


def test_sample_cost_on_a_worked_example():
    """d = 2 heads x 4 = 8, one KV head (d_kv = 4), m = 16, 3 layers; 5 text tokens and 4, 4, 2 visual tokens per
    layer: lengths 9, 9, 7. A layer's MACs (convention A) 2nd^2 + 2nd d_kv + 2n^2 d + 2ndm = 448 n + 16 n^2: 5328,
    5328, 3920 = 14576, so 2 x 14576 / 1e12 TFLOPs. KV: per token and layer 2 x 1 x 4 elements x 2 bytes (fp16) =
    16 bytes, over 25 token-layers = 400 bytes."""
    tc = SimpleNamespace(hidden_size=8, num_attention_heads=2, head_dim=4, num_key_value_heads=1, intermediate_size=16,
                         num_hidden_layers=3, layer_types=None)
    cost = sample_cost(SimpleNamespace(text_config=tc), 5, [4, 4, 2], 2)
    assert cost == {"prefill_tflops": 2 * 14576 / 1e12, "kv_mb": 400 / 2 ** 20}
