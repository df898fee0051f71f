"""HTSAT's Swin transformer for inference: the same numbers, less memory traffic, nothing thrown away.

In eval mode laion-clap's HTSAT does work a server never returns: every
block's attention map is kept, and each stage concatenates and averages them
(a visualisation aid), and ``forward_features`` builds frame-wise class
activations (a convolution to 527 classes, sigmoids, interpolations) beside
the one output clap-ws uses, the ``embedding``. Its blocks also move every
token four times (roll, partition into windows, and back), and its window
attention adds the relative position bias and the shift mask in passes of
their own.

:func:`serve_swin` swaps four forwards, on the instances only, keeping the
weights (and ``state_dict``) as they are:

* a block reorders its tokens into windows with one precomputed gather, and
  back with one more;
* window attention adds the bias (relative position plus shift mask, built
  once per weights and dtype) inside the score matmul (``baddbmm``).
  PyTorch's fused ``scaled_dot_product_attention`` was slower for these
  small heads (64 tokens of 24 channels) on the CPU;
* a stage runs its blocks and its patch merging, and keeps no attention map;
* ``forward_features`` returns only ``{"embedding": ...}``: the mean of the
  normed tokens, which is what laion-clap's regrouping of them followed by
  an average pool computes (a mean does not depend on the order of tokens).

They take less time per window than laion-clap's forwards (figures:
``docs/experiments.md``). The parity test against laion-clap's own code
(fp32, cosine >= 0.99999) runs through them.
"""

from __future__ import annotations

import sys

import torch


def serve_swin(branch: torch.nn.Module) -> bool:
    """Give an HTSAT audio branch the inference forwards above; False (and nothing changed) for other branches."""
    if not hasattr(branch, "layers") or not hasattr(branch, "forward_features"):
        return False
    if "forward_features" in vars(branch):
        return True  # already adapted (tests build several models on one network)
    for stage in branch.layers:
        for block in stage.blocks:
            block.attn.forward = _window_attention(block.attn)
            block.forward = _block(block)
        stage.forward = _stage(stage)
    branch.forward_features = _embedding_only(branch)
    return True


def _window_attention(attn: torch.nn.Module):
    """``WindowAttention.forward`` with the bias added in the score matmul; returns ``(x, None)``: no attention map."""
    heads, scale = attn.num_heads, attn.scale
    n = attn.window_size[0] * attn.window_size[1]
    cache: dict = {}

    def window_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Relative position bias plus shift mask, (nW or 1, heads, N, N)."""
        table = attn.relative_position_bias_table
        bias = table[attn.relative_position_index.view(-1)].view(n, n, heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:  # (nW, N, N): windows that straddle the shift see -100 between their parts
            bias = bias + mask.unsqueeze(1)
        return bias.to(dtype).contiguous()

    def cached_window_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        table = attn.relative_position_bias_table
        key = (dtype, table.device, table.data_ptr(), table._version,
               None if mask is None else (mask.data_ptr(), mask._version))
        if key not in cache:
            cache.clear()
            cache[key] = window_bias(mask, dtype)
        return cache[key]

    def forward(x: torch.Tensor, mask: torch.Tensor | None = None):
        windows, tokens, channels = x.shape
        qkv = attn.qkv(x).view(windows, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (windows, heads, N, head_dim), views
        bias = window_bias(mask, x.dtype) if torch.compiler.is_compiling() else cached_window_bias(mask, x.dtype)
        if bias.shape[0] != windows:  # several clips: windows are clip-major, so the biases repeat per clip
            bias = bias.repeat(windows // bias.shape[0], 1, 1, 1)
        depth = channels // heads
        scores = torch.baddbmm(bias.view(-1, tokens, tokens), q.reshape(-1, tokens, depth),
                               k.reshape(-1, tokens, depth).mT, alpha=scale)
        out = torch.matmul(scores.softmax(-1).view(windows, heads, tokens, tokens), v)
        return attn.proj(out.transpose(1, 2).reshape(windows, tokens, channels)), None

    return forward


def _block(block: torch.nn.Module):
    """``SwinTransformerBlock.forward`` with the cyclic shift and the window partition as one gather.

    laion-clap rolls the token grid, copies it into windows, and after the
    attention copies it back and rolls it back: four passes over the
    activations. Tokens are only reordered, so one precomputed index does it
    each way. Returns ``(x, None)``: no attention map.
    """
    (height, width), size, shift = block.input_resolution, block.window_size, block.shift_size
    window_partition = sys.modules[type(block).__module__].window_partition  # laion-clap's own, on token numbers
    order = torch.arange(height * width, device=block.norm1.weight.device).view(1, height, width, 1)
    if shift:
        order = torch.roll(order, shifts=(-shift, -shift), dims=(1, 2))
    order = window_partition(order, size).reshape(-1)
    block.register_buffer("_clap_ws_order", order, persistent=False)
    block.register_buffer("_clap_ws_inverse", torch.argsort(order), persistent=False)

    def forward(x: torch.Tensor):
        batch, tokens, channels = x.shape
        windows = block.norm1(x).index_select(1, block._clap_ws_order).view(-1, size * size, channels)
        attended = block.attn(windows, mask=block.attn_mask)[0].view(batch, tokens, channels)
        x = x + attended.index_select(1, block._clap_ws_inverse)
        return x + block.mlp(block.norm2(x)), None

    return forward


def _stage(stage: torch.nn.Module):
    """``BasicLayer.forward`` without collecting and averaging its blocks' attention maps."""

    def forward(x: torch.Tensor):
        for block in stage.blocks:
            x = block(x)[0]
        if stage.downsample is not None:
            x = stage.downsample(x)
        return x, None

    return forward


def _embedding_only(branch: torch.nn.Module):
    """``forward_features`` computing only ``embedding`` (the regrouping is a permutation, the pool a mean)."""

    def forward_features(x: torch.Tensor, longer_idx=None) -> dict:
        x = branch.patch_embed(x, longer_idx=longer_idx)
        if branch.ape:
            x = x + branch.absolute_pos_embed
        for stage in branch.layers:
            x = stage(x)[0]
        return {"embedding": branch.norm(x).mean(dim=1)}

    return forward_features
