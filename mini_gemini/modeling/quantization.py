"""8-bit weights for CPU inference, filled while the checkpoint streams in (`load_pretrained(quantization="int8")`).

Format ("int8", W8A8 with dynamic activations):
- weights: int8, symmetric, one float32 scale per output row (per output channel): w ≈ q * s, s = max|w_row| / 127,
  q = round(w / s) in [-127, 127]. Error per weight ≤ s / 2 = max|w_row| / 254.
- activations: quantized on the fly, per token (per row of the input), symmetric int8 the same way.
- product: `torch._int_mm` (int8 × int8 → int32, exact integer accumulation; PyTorch's CPU kernel, oneDNN:
  AVX512-VNNI where the CPU has it, AVX2 otherwise), then y = acc * s_x[row] * s_w[col] (+ bias) in float32.

Because every scale belongs to one token or one output channel and integer sums are exact, a token's output
does not depend on the other tokens of the forward: the engine's packed batches give each request the answer
it would get alone, exactly as in float32.

What is quantized: every `nn.Linear` of the LLM's decoder layers and its output head, Mixtral's fused experts,
the token embedding (rows gathered, then dequantized; shared with the head when they are tied), the Linear
layers of both vision towers (CLIP's attention and MLP, the ConvNeXt blocks' MLPs) and of patch info mining
(its key / value projections of the 192 x 192 HR map are the largest single cost of encoding an image, ~435
GFLOP at MGM's shapes). What stays float32: norms, convolutions, the Mixtral router, the mining softmax and
weighted sum (the maps are computed as before, from int8-projected queries and keys), the projector, every bias.

Memory: the loader hands each tensor over once; it is converted and quantized in blocks of rows
(`BLOCK_ROWS`), so no float32 copy of a whole large tensor exists at any time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("int8",)
BLOCK_ROWS = 8192  # rows converted to float32 at a time while quantizing (the 256000-row embedding: 64 MB)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last dimension.

    Args:
        w: (..., K) floating tensor, any dtype (bf16 checkpoints are converted block by block).

    Returns:
        (q, scale): q int8 of w's shape, scale float32 of shape w.shape[:-1]; w ≈ q * scale[..., None].
        A row of zeros gets scale 1 (and q = 0).
    """
    flat = w.reshape(-1, w.shape[-1])
    q = torch.empty(flat.shape, dtype=torch.int8)
    scale = torch.empty(flat.shape[0], dtype=torch.float32)
    for start in range(0, flat.shape[0], BLOCK_ROWS):
        block = flat[start:start + BLOCK_ROWS].to(torch.float32)
        s = block.abs().amax(dim=-1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[start:start + BLOCK_ROWS] = torch.round(block / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[start:start + BLOCK_ROWS] = s
    return q.reshape(w.shape), scale.reshape(w.shape[:-1])


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (q * scale[:, None]).T + bias with x quantized per token (see the module docstring).

    Args:
        x: (..., K) float input (any float dtype; computed in float32).
        q: (N, K) int8 weight; scale: (N,) float32; bias: (N,) or None.

    Returns:
        (..., N) in x's dtype.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.float32)
    lo, hi = torch.aminmax(x2, dim=-1, keepdim=True)  # one pass for max|x| per token
    xs = torch.maximum(-lo, hi) / 127
    xs = torch.where(xs > 0, xs, torch.ones_like(xs))
    xq = torch.div(x2, xs).round_().to(torch.int8)
    y = torch._int_mm(xq, q.t()).to(torch.float32)  # (faster than a mixed int32 x float32 multiply)
    y.mul_(xs).mul_(scale)
    if bias is not None:
        y.add_(bias)
    return y.reshape(*shape[:-1], q.shape[0]).to(x.dtype)


class Int8Linear(nn.Module):
    """Drop-in for `nn.Linear` (inference only) holding an int8 weight and per-output-channel scales.

    Buffers: `qweight` (out_features, in_features) int8, `weight_scale` (out_features,) float32;
    `bias` (out_features,) float32 or None. Created empty on the meta device; `set_weight` fills it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device="meta"))
        self.register_buffer("weight_scale", torch.empty(out_features, device="meta"))
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None

    def set_weight(self, w: torch.Tensor):
        """Quantize the float weight (out_features, in_features) into this layer."""
        self.qweight, self.weight_scale = quantize_rows(w)

    def share_weight(self, q: torch.Tensor, scale: torch.Tensor):
        """Use an already quantized (out_features, in_features) table (a head tied to the token embedding)."""
        self.qweight, self.weight_scale = q, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Embedding(nn.Module):
    """Drop-in for the LLM's token embedding: int8 rows with per-row scales, dequantized when gathered.

    Keeps the replaced module's `embed_scale` buffer (Gemma multiplies every embedding by sqrt(hidden)), so
    callers that scale visual tokens the same way still find it. `weight` is the int8 table (for its device).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 embed_scale: torch.Tensor | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device="meta"))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, device="meta"))
        if embed_scale is not None:
            self.register_buffer("embed_scale", embed_scale.detach().clone().float(), persistent=False)
        else:
            self.embed_scale = None

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight

    def set_weight(self, w: torch.Tensor):
        """Quantize the float table (num_embeddings, embedding_dim) into this layer."""
        self.qweight, self.weight_scale = quantize_rows(w)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(input_ids, self.qweight).to(torch.float32) * self.weight_scale[input_ids].unsqueeze(-1)
        return out * self.embed_scale if self.embed_scale is not None else out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


class Int8Experts(nn.Module):
    """Drop-in for transformers' fused Mixtral experts (`MixtralExperts`): the same routing loop, int8 weights.

    Buffers: `gate_up` (E, 2I, H) int8 with `gate_up_scale` (E, 2I); `down` (E, H, I) int8 with `down_scale`
    (E, H). Filled one expert slice at a time (`set_slice`), as the checkpoint stores experts one by one.
    """

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.num_experts, self.hidden_dim = experts.num_experts, experts.hidden_dim
        self.intermediate_dim = experts.intermediate_dim
        self.act_fn = experts.act_fn
        e, h, i = self.num_experts, self.hidden_dim, self.intermediate_dim
        self.register_buffer("gate_up", torch.zeros(e, 2 * i, h, dtype=torch.int8))
        self.register_buffer("gate_up_scale", torch.zeros(e, 2 * i))
        self.register_buffer("down", torch.zeros(e, h, i, dtype=torch.int8))
        self.register_buffer("down_scale", torch.zeros(e, h))

    def set_slice(self, which: str, expert: int, rows: slice, w: torch.Tensor):
        """Quantize one stored piece: which = "gate_up" (rows of the fused gate/up block) or "down"."""
        q, s = quantize_rows(w)
        getattr(self, which)[expert, rows] = q
        getattr(self, which + "_scale")[expert, rows] = s

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            token_idx, pos = torch.where(top_k_index == expert)
            gate, up = int8_linear(hidden_states[token_idx], self.gate_up[expert],
                                   self.gate_up_scale[expert]).chunk(2, dim=-1)
            h = int8_linear(self.act_fn(gate) * up, self.down[expert], self.down_scale[expert])
            out.index_add_(0, token_idx, (h * top_k_weights[token_idx, pos, None]).to(out.dtype))
        return out


class Int8Loader:
    """Swaps a meta-initialised `MiniGemini`'s layers for int8 ones and fills them as the loader streams tensors.

    Usage (the checkpoint loader): `q = Int8Loader(model, tied=...)` after reading the float model's expected
    names and shapes, then for every tensor `q.take(name, tensor, slot)`; True means it was consumed here.
    `finish()` ties the output head to the embedding when the config ties them.
    """

    def __init__(self, model: nn.Module, tied: bool):
        self.tied = tied
        self.targets: dict[str, tuple[nn.Module, str]] = {}  # parameter name -> (new module, "weight"/"bias"/expert part)
        self._swap(model)

    def _swap(self, model: nn.Module):
        llm = model.llm
        roots = [("llm.model.layers", llm.model.layers)]
        if getattr(llm, "lm_head", None) is not None:
            roots.append(("llm.lm_head", llm.lm_head))
        roots += [("vision_tower", model.vision_tower), ("vision_tower_aux", model.vision_tower_aux),
                  ("mining", model.mining)]
        for prefix, root in roots:
            if isinstance(root, nn.Linear):
                self._replace_linear(llm, "lm_head", root, prefix)
                continue
            for name, module in list(root.named_modules()):
                for child_name, child in list(module.named_children()):
                    full = ".".join(p for p in (prefix, name, child_name) if p)
                    if type(child) is nn.Linear:
                        self._replace_linear(module, child_name, child, full)
                    elif type(child).__name__ == "MixtralExperts":
                        new = Int8Experts(child)
                        setattr(module, child_name, new)
                        self.targets[full + ".gate_up_proj"] = (new, "gate_up")
                        self.targets[full + ".down_proj"] = (new, "down")
        emb = llm.get_input_embeddings()
        new = Int8Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, getattr(emb, "embed_scale", None))
        llm.set_input_embeddings(new)
        self.targets["llm.model.embed_tokens.weight"] = (new, "weight")

    def _replace_linear(self, parent: nn.Module, attr: str, lin: nn.Linear, full: str):
        new = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None)
        setattr(parent, attr, new)
        self.targets[full + ".weight"] = (new, "weight")
        if lin.bias is not None:
            self.targets[full + ".bias"] = (new, "bias")

    def take(self, name: str, value: torch.Tensor, slot=None) -> bool:
        """Consume one checkpoint tensor (our internal name) if it belongs to a quantized layer.

        slot: for Mixtral's experts, (expert index, "gate" | "up" | "down") of this piece of the fused tensor.
        """
        target = self.targets.get(name)
        if target is None:
            return False
        module, part = target
        if part == "bias":
            module.bias = nn.Parameter(value.to(torch.float32), requires_grad=False)
        elif part == "weight":
            module.set_weight(value)
        else:  # a Mixtral expert's gate, up or down matrix
            expert, piece = slot
            i = module.intermediate_dim
            rows = {"down": slice(None), "gate": slice(0, i), "up": slice(i, 2 * i)}[piece]
            module.set_slice(part, expert, rows, value)
        return True

    def finish(self, model: nn.Module):
        """Point the output head at the embedding's int8 table when the config ties them."""
        llm = model.llm
        if self.tied and isinstance(getattr(llm, "lm_head", None), Int8Linear):
            emb = llm.get_input_embeddings()
            llm.lm_head.share_weight(emb.qweight, emb.weight_scale)


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds layers of this module (it cannot be trained or saved then)."""
    return any(isinstance(m, (Int8Linear, Int8Embedding, Int8Experts)) for m in model.modules())
