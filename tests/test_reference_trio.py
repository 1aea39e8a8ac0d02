"""TRIO: the official selection step (ocy1/TRIO @ ec85d99, llava/model/modeling_llama_x.py ``layer_prune``, added
by 77f024a) transcribed from reading it, on random tensors at the official shapes: the proxy loss's rows
(``_loss_on_current_layer``, ``loss_mode="multi_pos"``), the saliency and the two-round NMS. The kept sets equal
ours under ``numerics="official"``; the default mode agrees up to fp16 ties."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import baselines.trio  # noqa: F401
from baselines.trio import trio_nms
from llava.proxy_grad import proxy_rows

IGNORE = -100


def official_multi_pos_loss(logits, attention_mask=None, K_pos=4):
    """``_loss_on_current_layer`` after the layer: shift, the last K_pos valid shifted rows, CE against their own
    argmax (fp32), mean (modeling_llama_x.py:1459-1501)."""
    shift_logits = logits[..., :-1, :].contiguous()
    shift_mask = attention_mask[..., 1:].contiguous().bool() if attention_mask is not None else None
    B, S1, V = shift_logits.shape
    f = shift_logits.float()
    pos_mask = torch.zeros((B, S1), dtype=torch.bool)
    if shift_mask is not None:
        valid_len = shift_mask.long().sum(dim=1)
        for b in range(B):
            L = int(valid_len[b].item())
            if L <= 0:
                pos_mask[b, S1 - 1] = True
                continue
            for t in range(K_pos):
                pos_mask[b, max(0, min(S1 - 1, L - 1 - t))] = True
    else:
        for b in range(B):
            for t in range(K_pos):
                pos_mask[b, max(0, S1 - 1 - t)] = True
    pseudo = f.detach().argmax(dim=-1)
    labels = torch.where(pos_mask, pseudo, torch.full_like(pseudo, IGNORE))
    return F.cross_entropy(f.view(-1, V), labels.view(-1), ignore_index=IGNORE, reduction="mean")


def official_select(grad, features, img_start, img_len, k_keep, dtype_hidden=torch.float16):
    """The selection of one sample (modeling_llama_x.py:1620-1700): fp16 grad norm, argsort, NMS at tau 0.8 in
    numpy, fill round, sorted local indices."""
    grad = grad.to(dtype_hidden)
    token_scores = grad.norm(p=2, dim=-1)
    vis_scores = token_scores[img_start: img_start + img_len]
    k_keep_local = min(k_keep, vis_scores.numel())
    order = torch.argsort(vis_scores, descending=True)
    tau = 0.8
    vis_feats = F.normalize(features[img_start: img_start + img_len, :].to(torch.float32), dim=-1)
    N_vis = vis_feats.size(0)
    neighbor_mask_np = (torch.matmul(vis_feats, vis_feats.T) >= tau).cpu().numpy()
    order_np = order.cpu().numpy()
    selected, selected_set = [], set()
    suppressed_np = np.zeros(N_vis, dtype=bool)
    for idx in order_np:
        if len(selected) >= k_keep_local:
            break
        if suppressed_np[idx]:
            continue
        selected.append(int(idx))
        selected_set.add(int(idx))
        suppressed_np |= neighbor_mask_np[idx]
    if len(selected) < k_keep_local:
        for idx in order_np:
            if len(selected) >= k_keep_local:
                break
            if int(idx) not in selected_set:
                selected.append(int(idx))
                selected_set.add(int(idx))
    return torch.tensor(sorted(selected))


def test_proxy_loss_rows_equal_official():
    g = torch.Generator().manual_seed(0)
    for S in (700, 30, 5, 3):
        logits = torch.randn(1, S, 50, generator=g, dtype=torch.float64)
        rows = proxy_rows(S, "shifted", 4)
        z = logits[0, rows].float()
        ours = F.cross_entropy(z, z.argmax(-1))
        assert torch.allclose(ours, official_multi_pos_loss(logits), atol=1e-6)
        assert torch.allclose(ours, official_multi_pos_loss(logits, torch.ones(1, S)), atol=1e-6)


def _inputs(seed, S, img_start, n, D=4096):
    """Hidden states with near-duplicate visual rows (clusters, so that the NMS suppresses) and a gradient whose
    norms vary per token (fp16, as the official fp16 LLaVA)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(S, D, generator=g)
    centres = torch.randn(n // 6, D, generator=g)
    feats[img_start: img_start + n] = (centres[torch.randint(0, n // 6, (n,), generator=g)]
                                       + 0.5 * torch.randn(n, D, generator=g))
    grad = torch.randn(S, D, generator=g) * torch.rand(S, 1, generator=g) * 1e-3
    return feats.half(), grad.half()


@pytest.mark.parametrize("n,k", [(576, 218), (218, 128), (128, 54), (576, 92), (92, 54), (54, 22), (96, 32)])
def test_selection_equals_official(n, k):
    img_start, S = 35, 35 + n + 60
    for seed in range(3):
        feats, grad = _inputs(seed, S, img_start, n)
        ref = official_select(grad, feats, img_start, n, k)
        vis = torch.arange(img_start, img_start + n)
        sal = grad[vis].to(torch.float16).norm(p=2, dim=-1)  # LLMSignals.grad_saliency(dtype=model dtype)
        ours = trio_nms(sal, feats[vis], k, numerics="official")
        assert torch.equal(ours, ref)
        # the default (fp32 norm, ties to the lower index) keeps nearly the same set
        default = trio_nms(grad[vis].float().norm(dim=-1), feats[vis], k)
        assert default.numel() == k
        overlap = len(set(default.tolist()) & set(ref.tolist())) / k
        assert overlap >= 0.9, overlap


def test_suppression_happens_at_official_shapes():
    """The planted clusters make the NMS differ from plain top-k (so the test above checks the NMS)."""
    feats, grad = _inputs(0, 700, 35, 576)
    vis = torch.arange(35, 611)
    sal = grad[vis].float().norm(dim=-1)
    assert not torch.equal(trio_nms(sal, feats[vis], 218), trio_nms(sal, feats[vis], 218, tau=None))
