"""HTSAT's Swin transformer for inference: the same numbers, less memory traffic, nothing thrown away.

In eval mode laion-clap's HTSAT does work a server never returns: every
block's attention map is kept, and each stage concatenates and averages them
(a visualisation aid), and ``forward_features`` builds frame-wise class
activations (a convolution to 527 classes, sigmoids, interpolations) beside
the one output clap-ws uses, the ``embedding``. Its blocks also move every
token four times (roll, partition into windows, and back), and its window
attention adds the relative position bias and the shift mask in passes of
their own.

:class:`Swin` is a module of its own over the branch's layers (the same
weights; laion-clap's modules are not changed, so its own forwards stay as
they are):

* a :class:`Block` reorders its tokens into windows with one precomputed
  gather, and back with one more;
* :class:`WindowAttention` adds the bias (relative position plus shift mask,
  built once per weights and dtype) inside the score matmul (``baddbmm``).
  PyTorch's fused ``scaled_dot_product_attention`` was slower for these
  small heads (64 tokens of 24 channels) on the CPU;
* a :class:`Stage` runs its blocks and its patch merging, and keeps no attention map;
* :class:`Swin` returns only the embedding: the mean of the normed tokens,
  which is what laion-clap's regrouping of them followed by an average pool
  computes (a mean does not depend on the order of tokens).

They take less time per window than laion-clap's forwards (figures:
``docs/experiments.md``). The parity test against laion-clap's own code
(fp32, cosine >= 0.99999) runs through them.
"""

from __future__ import annotations

import sys

import torch


def is_swin(branch: torch.nn.Module) -> bool:
    """Whether ``branch`` is an HTSAT audio branch :class:`Swin` can serve."""
    return hasattr(branch, "layers") and hasattr(branch, "forward_features") and hasattr(branch, "patch_embed")


class WindowAttention(torch.nn.Module):
    """``WindowAttention.forward`` with the bias added in the score matmul; no attention map."""

    def __init__(self, attn: torch.nn.Module):
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.table = attn.relative_position_bias_table  # the same parameter: new weights are seen
        self.register_buffer("index", attn.relative_position_index, persistent=False)
        self.heads, self.scale = attn.num_heads, attn.scale
        self.n = attn.window_size[0] * attn.window_size[1]
        self._cache: dict = {}

    def window_bias(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Relative position bias plus shift mask, (nW or 1, heads, N, N)."""
        n, heads = self.n, self.heads
        bias = self.table[self.index.view(-1)].view(n, n, heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:  # (nW, N, N): windows that straddle the shift see -100 between their parts
            bias = bias + mask.unsqueeze(1)
        return bias.to(dtype).contiguous()

    def cached_window_bias(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`window_bias`, built again only when the weights (or their values), mask or dtype change."""
        table = self.table
        key = (dtype, table.device, table.data_ptr(), table._version,
               None if mask is None else (mask.data_ptr(), mask._version))
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = self.window_bias(mask, dtype)
        return self._cache[key]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        windows, tokens, channels = x.shape
        heads = self.heads
        qkv = self.qkv(x).view(windows, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (windows, heads, N, head_dim), views
        bias = self.window_bias(mask, x.dtype) if torch.compiler.is_compiling() else \
            self.cached_window_bias(mask, x.dtype)
        if bias.shape[0] != windows:  # several clips: windows are clip-major, so the biases repeat per clip
            bias = bias.repeat(windows // bias.shape[0], 1, 1, 1)
        depth = channels // heads
        scores = torch.baddbmm(bias.view(-1, tokens, tokens), q.reshape(-1, tokens, depth),
                               k.reshape(-1, tokens, depth).mT, alpha=self.scale)
        out = torch.matmul(scores.softmax(-1).view(windows, heads, tokens, tokens), v)
        return self.proj(out.transpose(1, 2).reshape(windows, tokens, channels))


class Block(torch.nn.Module):
    """``SwinTransformerBlock.forward`` with the cyclic shift and the window partition as one gather.

    laion-clap rolls the token grid, copies it into windows, and after the
    attention copies it back and rolls it back: four passes over the
    activations. Tokens are only reordered, so one precomputed index does it
    each way.
    """

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, WindowAttention(block.attn), block.norm2, block.mlp
        (height, width), self.size, shift = block.input_resolution, block.window_size, block.shift_size
        self.block = [block]  # laion-clap's block, for its shift mask (a buffer a cast may replace); not a child
        window_partition = sys.modules[type(block).__module__].window_partition  # laion-clap's own, on token numbers
        order = torch.arange(height * width, device=block.norm1.weight.device).view(1, height, width, 1)
        if shift:
            order = torch.roll(order, shifts=(-shift, -shift), dims=(1, 2))
        order = window_partition(order, self.size).reshape(-1)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("inverse", torch.argsort(order), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        windows = self.norm1(x).index_select(1, self.order).view(-1, self.size * self.size, channels)
        attended = self.attn(windows, mask=self.block[0].attn_mask).view(batch, tokens, channels)
        x = x + attended.index_select(1, self.inverse)
        return x + self.mlp(self.norm2(x))


class Stage(torch.nn.Module):
    """``BasicLayer.forward`` without collecting and averaging its blocks' attention maps."""

    def __init__(self, stage: torch.nn.Module):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(block) for block in stage.blocks)
        self.downsample = stage.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class Swin(torch.nn.Module):
    """``forward_features`` computing only the embedding (the regrouping is a permutation, the pool a mean)."""

    def __init__(self, branch: torch.nn.Module):
        super().__init__()
        self.patch_embed, self.norm = branch.patch_embed, branch.norm
        self.absolute_pos_embed = branch.absolute_pos_embed if branch.ape else None
        self.stages = torch.nn.ModuleList(Stage(stage) for stage in branch.layers)

    def forward(self, x: torch.Tensor, longer_idx=None) -> torch.Tensor:
        x = self.patch_embed(x, longer_idx=longer_idx)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        for stage in self.stages:
            x = stage(x)
        return self.norm(x).mean(dim=1)
