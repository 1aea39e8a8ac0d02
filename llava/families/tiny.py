"""Tiny random-weight configs of each architecture, for the tiny test models that :func:`llava.models.build_tiny`
builds: pure data over transformers' config classes, one builder per family, each taking the tiny tokenizer (its
vocabulary and placeholder ids) and named by the family's record (:mod:`llava.families.registry`)."""

from __future__ import annotations


def _clip_common(tok, **extra):
    """CLIP 56 px / patch 14 (16 patches + [CLS]), 3 vision layers (select layer -2 = layer 1), Llama width 64,
    4 layers, 4 heads, 2 KV heads; the tokenizer's ``<image>`` id (and ``extra``)."""
    import transformers as tf

    vc = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             image_size=56, patch_size=14, projection_dim=32)
    tc = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024,
                        tie_word_embeddings=False)
    return dict(vision_config=vc, text_config=tc, image_token_id=tok.convert_tokens_to_ids("<image>"),
                vision_feature_layer=-2, vision_feature_select_strategy="default", **extra)


def _padded(cfg, tok):
    cfg.text_config.pad_token_id = tok.pad_token_id
    return cfg


def llava(tok):
    """LLaVA-1.5: the CLIP tower of :func:`_clip_common` and a Llama LLM."""
    import transformers as tf

    return _padded(tf.LlavaConfig(**_clip_common(tok)), tok)


def llava_next(tok):
    """LLaVA-NeXT: LLaVA-1.5's sizes, anyres over 56 x 112, 112 x 56 and 112 x 112 pinpoints."""
    import transformers as tf

    return _padded(tf.LlavaNextConfig(**_clip_common(tok, image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]])),
                   tok)


def video_llava(tok):
    """Video-LLaVA: LLaVA-1.5's sizes with the ``<video>`` placeholder."""
    import transformers as tf

    return _padded(tf.VideoLlavaConfig(**_clip_common(tok, video_token_id=tok.convert_tokens_to_ids("<video>"))), tok)


def _chatml(tok):
    """The ChatML tiny tokenizer's placeholder ids and the text config every ChatML tiny model shares (4 LLM layers:
    pruning methods need stage layers)."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                       "<|vision_end|>", "<image>", "<video>", "<IMG_CONTEXT>")}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=None,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return ids, text


def qwen2_5_vl(tok):
    """Qwen2.5-VL: windowed tower (full attention in blocks 1, 3), M-RoPE sections [2, 3, 3]."""
    import transformers as tf

    ids, text = _chatml(tok)
    vc = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3], out_hidden_size=64,
              tokens_per_second=2)
    tc = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    return tf.Qwen2_5_VLConfig(vision_config=vc, text_config=tc, image_token_id=ids["<|image_pad|>"],
                               video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                               vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def qwen2_vl(tok):
    """Qwen2-VL: Qwen2.5-VL's sizes; the tower's width is ``embed_dim`` (its ``hidden_size`` is the LLM's)."""
    import transformers as tf

    ids, text = _chatml(tok)
    vc = dict(depth=4, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2)
    tc = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    return tf.Qwen2VLConfig(vision_config=vc, text_config=tc, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def qwen3_vl(tok):
    """Qwen3-VL: DeepStack after the tower's blocks 0, 1, 2 -> added after LLM layers 0, 1, 2."""
    import transformers as tf

    ids, text = _chatml(tok)
    vc = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
              deepstack_visual_indexes=[0, 1, 2])
    tc = dict(text, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                  "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    return tf.Qwen3VLConfig(vision_config=vc, text_config=tc, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def qwen3_5(tok):
    """Qwen3.5: Qwen3-VL's tower without DeepStack; hybrid LLM: layers 0, 2 Gated DeltaNet, 1, 3 full."""
    import transformers as tf

    ids, text = _chatml(tok)
    vc = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16)
    tc = dict(text, head_dim=16, layer_types=["linear_attention", "full_attention"] * 2, linear_conv_kernel_dim=4,
              linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
              rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1],
                               "mrope_interleaved": True, "partial_rotary_factor": 0.5})
    return tf.Qwen3_5Config(vision_config=vc, text_config=tc, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def internvl(tok):
    """InternVL3.5's layout: InternViT ([CLS], pixel shuffle 0.5) + a Qwen3 LLM (q / k norm)."""
    import transformers as tf

    ids, text = _chatml(tok)
    # 112-px tiles of 8 x 8 patches -> 4 x 4 = 16 tokens each; the vision tower with qk-norm and RMSNorm
    # (InternViT-6B's variant, so those code paths are exercised; the 300M tower of the 8B model has neither)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=112,
              patch_size=14, use_qk_norm=True, norm_type="rms_norm", attention_bias=True)
    tc = dict(text, model_type="qwen3", head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    return tf.InternVLConfig(vision_config=vc, text_config=tc, image_token_id=ids["<IMG_CONTEXT>"],
                             image_seq_length=16, downsample_ratio=0.5, vision_feature_layer=-1,
                             vision_feature_select_strategy="default", tie_word_embeddings=False)


def llava_onevision(tok):
    """LLaVA-OneVision: a SigLIP tower (no head), anyres_max_9 over 56-px pinpoints, a Qwen2 LLM."""
    import transformers as tf

    ids, text = _chatml(tok)
    vc = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, image_size=56, patch_size=14, vision_use_head=False)
    tc = dict(text, model_type="qwen2", rope_theta=1e4)
    pinpoints = [[56 * a, 56 * b] for a in range(1, 5) for b in range(1, 5)]
    return tf.LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_id=ids["<image>"],
                                   video_token_id=ids["<video>"], vision_feature_select_strategy="full",
                                   vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
                                   image_grid_pinpoints=pinpoints, tie_word_embeddings=False)
