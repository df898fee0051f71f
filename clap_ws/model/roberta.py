"""CLAP's RoBERTa text encoder for inference: the same layers, without transformers' general-purpose forward.

A prompt is a few tokens, so a text embedding is 75 small matmuls that each
read a whole weight matrix, and transformers' ``RobertaModel`` forward adds
Python around them (mask preparation, attention dispatch, output objects,
hooks) on the critical path of every uncached prompt (figures:
``docs/experiments.md``).

:class:`Roberta` is a module over the same layers whose forward runs the same
modules in the same order - embeddings, then per layer query/key/value, the
attention (``scaled_dot_product_attention``, the kernel transformers itself
picks), the output projection and its layer norm, the feed-forward and its
layer norm - and returns only ``pooler_output``, the one output CLAP uses.
The weights stay in their modules (so packing them for oneDNN and
``state_dict`` work as before); a model laid out differently is served by its
own forward.
The parity test against laion-clap's own code (fp32, cosine >= 0.99999)
runs through it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class Roberta(torch.nn.Module):
    """The lean forward above over a transformers ``RobertaModel``'s own layers (see :meth:`can_serve`)."""

    def __init__(self, branch: torch.nn.Module):
        super().__init__()
        self.embeddings, self.pooler = branch.embeddings, branch.pooler
        self.heads = branch.config.num_attention_heads
        self.layers = torch.nn.ModuleList(torch.nn.ModuleList([
            layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
            layer.attention.output.dense, layer.attention.output.LayerNorm, layer.intermediate.dense,
            layer.intermediate.intermediate_act_fn, layer.output.dense, layer.output.LayerNorm])
            for layer in branch.encoder.layer)

    @staticmethod
    def can_serve(branch: torch.nn.Module) -> bool:
        """Whether ``branch`` is a plain encoder-only ``RobertaModel`` with absolute positions and a pooler."""
        try:
            layer = branch.encoder.layer[0]
            parts = (layer.attention.self.query, layer.attention.output.LayerNorm, layer.intermediate.dense,
                     layer.output.dense, branch.embeddings, branch.config.num_attention_heads)
            return (all(p is not None for p in parts) and not branch.config.is_decoder and branch.pooler is not None
                    and isinstance(layer.intermediate.intermediate_act_fn, torch.nn.Module)
                    and getattr(branch.config, "position_embedding_type", "absolute") == "absolute")
        except (AttributeError, IndexError, TypeError):
            return False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        x = self.embeddings(input_ids=input_ids)
        batch, tokens, channels = x.shape
        heads = self.heads
        # padded keys are not attended to; without padding (one text, or texts of one length) no mask at all,
        # which spares the attention kernel's masking. Under torch.compile and torch.export the mask is always
        # passed: testing it would break the graph in two (or stop an export).
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        unpadded = not tracing and bool(attention_mask.all())
        keep = None if unpadded else attention_mask.bool()[:, None, None, :]

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, heads, T, C / heads)
            return t.view(batch, tokens, heads, channels // heads).transpose(1, 2)

        for layer in self.layers:
            parts: list[Any] = list(layer)
            query, key, value, out, out_norm, up, act, down, down_norm = parts
            attended = F.scaled_dot_product_attention(split(query(x)), split(key(x)), split(value(x)),
                                                      attn_mask=keep)
            x = out_norm(out(attended.transpose(1, 2).reshape(batch, tokens, channels)) + x)
            x = down_norm(down(act(up(x))) + x)
        return {"pooler_output": self.pooler(x)}
