"""Answer attribution: which visual tokens, and through the patch-info-mining weights which high-resolution
pixels, each answer token drew on; and how much each answer token owed to mining.

    prompt ids (IMAGE_TOKEN_INDEX slots) --embed with the visual tokens--> (1, Lp, D), then the answer ids
    ONE extra forward over the whole conversation (never on the decode path):
        every layer of the range keeps only the softmax rows of the answer positions over the image
        positions (A x K per layer, never L x L)  -> relevance r (A answer tokens x V*N visual tokens) per image
    down through mining (per view, HD included):
        hr[t, v, pixel] = sum over the LR tokens i of view v whose window holds the pixel of r[t, v, i] * a[v, i, pixel]
        (one token per pixel and view: each LR token mines its own P x P window of the HR map)
    mining ablation: p(answer token | projector(x)) against p(answer token | projector(x + mined)), teacher-forced

Answer token t is written by the position before it (the last prompt position for t = 0), so its attention
row, its gradient and its probability are all read at position Lp - 1 + t.

Entry point for the engine: `explain_answer(model, input_ids, images, answer_ids, method=..., layers=...)`
-> `Attribution`. The lower-level `answer_attention` / `answer_relevancy` work on any transformers causal LM of
the four families (Gemma, Llama, Mistral, Mixtral: GQA and sliding windows included).

Concurrency: the pass switches the LLM's attention implementation (`set_attn_implementation`) for its own
forward and restores it after; the caller must not run another forward of the same model at the same time
(the engine runs it under its compute lock, between scheduler rounds).
"""
from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..constants import IMAGE_TOKEN_INDEX

METHODS = ("attention", "relevancy")
ATTRIBUTION = "mgm_attribution"   # the attention implementation name used during the attribution pass
_local = threading.local()


# ---- layer range ----------------------------------------------------------------------------------
def default_layers(num_layers: int, method: str = "attention") -> tuple[int, int]:
    """The default layer range [start, stop) for `method` in an LLM of `num_layers` layers.

    attention: the middle of the network, from a quarter to three quarters of the depth (at least one layer).
        Kaduri, Bagon & Dekel, "What's in the Image? A Deep-Dive into the Vision of Vision Language Models"
        (arXiv 2411.17491, 2024): the cross-modal flow from the image tokens happens mainly in the middle
        layers (about a quarter of them), early and late layers contribute marginally, and there generated
        tokens attend to their objects' own image regions. Chen et al., "An Image is Worth 1/2 Tokens After
        Layer 2" (FastV, arXiv 2403.06764): the first layers spread attention over all image tokens, deep
        layers give them very little. Half the depth (not Kaduri's quarter) keeps the map steady when the
        grounding layers sit a little off-centre; on the demo model (4 layers: 1-2) it points at the asked
        square in 100 % of 400 held-out scenes (see tests/test_attribution.py).
    relevancy: every layer, as Chefer, Gur & Wolf's rule rolls relevancy out over the whole network
        (ICCV 2021, arXiv 2103.15679).
    """
    if method == "relevancy":
        return 0, num_layers
    start = num_layers // 4
    stop = max(start + 1, num_layers - num_layers // 4)
    return start, stop


def _check_layers(layers, num_layers: int) -> tuple[int, int]:
    start, stop = (int(x) for x in layers)
    if not 0 <= start < stop <= num_layers:
        raise ValueError(f"layers must be a range [start, stop) with 0 <= start < stop <= {num_layers}, "
                         f"got {tuple(layers)}")
    return start, stop


# ---- capture inside the attention --------------------------------------------------------------------
def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, L, d) -> (B, H_kv * groups, L, d): GQA keys/values for every query head."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _scores(query, key, attention_mask, scaling, softcap=None, positions=None):
    """Attention logits (B, H, Q, L) as eager attention computes them, masked: the bool mask of sdpa, an
    additive float mask, or None (= plain causal). `positions` (Q,): the sequence positions of the Q queries
    (default 0..Q-1, all of them)."""
    s = (query @ key.transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    qpos = torch.arange(query.shape[2], device=query.device) if positions is None else positions
    if attention_mask is None:
        allowed = torch.arange(key.shape[2], device=key.device)[None, :] <= qpos[:, None]
        return s.masked_fill(~allowed, float("-inf"))
    m = attention_mask[:, :, qpos]
    return s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m


@dataclass
class _Capture:
    """State of one attribution pass on this thread."""
    rows: torch.Tensor                 # (A,) query positions whose rows are kept
    columns: torch.Tensor              # (K,) key positions kept (the image positions)
    layers: tuple[int, int]            # [start, stop)
    per_head: bool = False
    relevancy: bool = False
    kept: dict = field(default_factory=dict)      # layer -> (H or 1, A, K) float32 rows
    probs: dict = field(default_factory=dict)     # relevancy: layer -> (1, H, L, L) attention probabilities
    row: torch.Tensor | None = None               # relevancy: the rolled-out relevancy row being built (L,)
    order: list = field(default_factory=list)     # relevancy: layers in the order their gradients arrived

    def __contains__(self, layer) -> bool:
        return layer is not None and self.layers[0] <= layer < self.layers[1]


def _attribution_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """The attention of an attribution pass: sdpa's output, plus the answer rows of the layers in range.

    query: (1, H, L, d); key, value: (1, H_kv, L, d) after RoPE; attention_mask: sdpa's bool mask or None."""
    cap: _Capture | None = getattr(_local, "capture", None)
    layer = getattr(module, "layer_idx", None)
    scaling = module.scaling if scaling is None else scaling
    softcap = kwargs.get("softcap")
    groups = getattr(module, "num_key_value_groups", 1)
    if cap is None or layer not in cap:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if cap.relevancy:
        # Chefer et al. need the gradient w.r.t. the attention probabilities: materialise them (eager).
        if layer == cap.layers[0]:  # the graph starts here: nothing below the range is recorded
            query, key, value = (t.detach().requires_grad_() for t in (query, key, value))
        k, v = _repeat_kv(key, groups), _repeat_kv(value, groups)
        probs = _scores(query, k, attention_mask, scaling, softcap).softmax(-1, dtype=torch.float32)
        cap.probs[layer] = probs
        probs.register_hook(_relevancy_hook(cap, layer))
        out = (probs.to(v.dtype) @ v).transpose(1, 2).contiguous()
        return out, None
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                    scaling=scaling, **kwargs)
    with torch.no_grad():
        rows = _scores(query[:, :, cap.rows].float(), _repeat_kv(key, groups).float(), attention_mask, scaling,
                       softcap, positions=cap.rows).softmax(-1)[0][:, :, cap.columns]   # (H, A, K)
        cap.kept[layer] = rows if cap.per_head else rows.mean(0, keepdim=True)
    return out, None


def _relevancy_hook(cap: _Capture, layer: int):
    """Chefer et al. (2021), eq. 5-6, for one query row: A_bar = mean_heads((grad * A)^+), R <- R + A_bar R.
    The row is rolled out top-down (row <- row + row @ A_bar) as the gradients arrive, one layer at a time,
    so no L x L relevancy matrix is ever kept for all rows."""
    def hook(grad: torch.Tensor):
        a_bar = (grad.float() * cap.probs[layer]).clamp_min(0).mean(1)[0]      # (L, L)
        cap.row = cap.row + cap.row @ a_bar
        cap.order.append(layer)
    return hook


AttentionInterface.register(ATTRIBUTION, _attribution_attention)
AttentionMaskInterface.register(ATTRIBUTION, sdpa_mask)   # sdpa's masks: causal, sliding windows


@contextmanager
def _capturing(llm, cap: _Capture):
    # transformers' documented way to read the implementation in use is `config._attn_implementation`
    previous = llm.config._attn_implementation
    llm.set_attn_implementation(ATTRIBUTION)
    _local.capture = cap
    try:
        yield cap
    finally:
        _local.capture = None
        llm.set_attn_implementation(previous)


def _as_index(x, device) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long, device=device).flatten()


def answer_attention(llm, inputs_embeds: torch.Tensor, rows, columns, layers: tuple[int, int], *,
                     per_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of a transformers causal LM that keeps only `rows` of each layer's attention over `columns`.

    Args:
        llm: the causal LM (Gemma/Llama/Mistral/Mixtral ForCausalLM).
        inputs_embeds: (1, L, D) the sequence, as the LLM's input embeddings.
        rows: (A,) query positions (ints in [0, L)); columns: (K,) key positions.
        layers: [start, stop) layer indices whose attention is kept.
        per_head: keep every head (else the mean over heads).

    Returns:
        (attn, logits): attn float32 (stop - start, H or 1, A, K): each row of the softmax over all L keys
        (causal mask and sliding window applied) at the kept columns, exactly the attention weights the LLM
        uses; logits (A, vocab) float32 at the rows.
    Memory: A x K floats per layer (and one A x L score block at a time), never L x L.
    """
    n_layers = llm.config.num_hidden_layers
    layers = _check_layers(layers, n_layers)
    dev = inputs_embeds.device
    cap = _Capture(_as_index(rows, dev), _as_index(columns, dev), layers, per_head=per_head)
    with torch.no_grad(), _capturing(llm, cap):
        out = llm(inputs_embeds=inputs_embeds, logits_to_keep=cap.rows, use_cache=False)
    attn = torch.stack([cap.kept[i] for i in range(*layers)])
    return attn, out.logits[0].float()


def answer_relevancy(llm, inputs_embeds: torch.Tensor, rows, columns, targets, layers: tuple[int, int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient-weighted relevancy (Chefer, Gur & Wolf, ICCV 2021, arXiv 2103.15679) of `columns` for the
    token `targets[t]` written at position `rows[t]`.

    For each target t, one backward from its logit gives, per layer l of the range, A_bar_l =
    mean over heads of (dlogit/dA_l * A_l)^+, and the relevancy row R[rows[t]] of
    R = (I + A_bar_last) ... (I + A_bar_first) over the range (Chefer's R <- R + A_bar R, layer by layer upwards;
    layers outside the range count as identity).

    Args:
        llm, inputs_embeds, rows, columns, layers: as `answer_attention`.
        targets: (A,) the token ids whose logits (at `rows`) are explained.

    Returns:
        (relevancy, logits): relevancy float32 (A, K) at the columns, logits (A, vocab) float32 at the rows.
    Cost: one forward that materialises the probabilities (H x L x L floats per layer of the range) and records
    the graph from the range's first layer, then one backward per target (gradients of the activations only,
    never of the weights). Measured with `python -m mini_gemini.bench_attribution --relevancy` (MGM-2B's
    shapes at 6 of its 18 layers, one 336-px image, 647 tokens, fp32, 2 CPU cores): a 4-token answer took
    11x one prefill and 1.4 GB at peak (30 % of those weights); time grows by ~2.5 prefills per answer
    token and memory with the layers (~4 GB for the whole MGM-2B). So: fine for models up to ~2B at 336 px
    and short answers; for HD (2880 visual tokens: 9x the L x L blocks) or 7B+ models use "attention".
    """
    n_layers = llm.config.num_hidden_layers
    layers = _check_layers(layers, n_layers)
    dev = inputs_embeds.device
    cap = _Capture(_as_index(rows, dev), _as_index(columns, dev), layers, relevancy=True)
    targets = _as_index(targets, dev)
    if len(targets) != len(cap.rows):
        raise ValueError(f"{len(targets)} targets for {len(cap.rows)} rows")
    seq = inputs_embeds.shape[1]
    with torch.enable_grad(), _capturing(llm, cap):
        out = llm(inputs_embeds=inputs_embeds.detach(), logits_to_keep=cap.rows, use_cache=False)
    logits = out.logits[0]
    chosen = logits.gather(-1, targets[:, None])[:, 0]
    result = []
    first = cap.probs[layers[0]]
    for t in range(len(targets)):
        cap.row = torch.zeros(seq, dtype=torch.float32, device=dev)
        cap.row[cap.rows[t]] = 1.0
        cap.order.clear()
        torch.autograd.grad(chosen[t], first, retain_graph=t + 1 < len(targets))
        if cap.order != sorted(cap.order, reverse=True) or len(cap.order) != layers[1] - layers[0]:
            raise RuntimeError(f"relevancy gradients arrived in the order {cap.order}, not top-down")
        result.append(cap.row[cap.columns].clone())
    cap.probs.clear()
    return torch.stack(result), logits.detach().float()


# ---- down through mining ------------------------------------------------------------------------------
def hr_maps(relevance: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Visual-token relevance carried down to HR pixels through the mining weights, per view.

    hr[t, v, pixel] = r[t, v, i] * a[v, i, j], where LR token i of view v holds the pixel in its P x P window
    at candidate j (each pixel lies in exactly one token's window per view). Geometry of
    `mini_gemini.viz.hr_map.mined_pixels` per view: token rows, then candidate rows inside each token.

    Args:
        relevance: (A, V, N) relevance of each visual token for each answer token (N = n*n).
        attn: (V, N, P*P) mining weights (`Encoded.attn` of one image).

    Returns:
        float32 (A, V, n*P, n*P). The mass of view v's map for token t is sum_i r[t, v, i] (weights sum to 1).

    Raises:
        ValueError: the shapes do not match.
    """
    r = torch.as_tensor(relevance, dtype=torch.float32)
    a = torch.as_tensor(attn, dtype=torch.float32, device=r.device)
    if r.ndim != 3 or a.ndim != 3 or r.shape[1:] != a.shape[:2]:
        raise ValueError(f"relevance (A, V, N) and mining weights (V, N, P*P) do not match: "
                         f"{tuple(r.shape)} and {tuple(a.shape)}")
    n, p = math.isqrt(a.shape[1]), math.isqrt(a.shape[2])
    if n * n != a.shape[1] or p * p != a.shape[2]:
        raise ValueError(f"mining weights {tuple(a.shape)} are not (V, n*n, P*P)")
    w = r[..., None] * a[None]                                                # (A, V, N, P*P)
    return w.reshape(len(r), a.shape[0], n, n, p, p).permute(0, 1, 2, 4, 3, 5).reshape(len(r), a.shape[0],
                                                                                      n * p, n * p)


# ---- the engine's entry point ---------------------------------------------------------------------------
@dataclass
class ImageEvidence:
    """What the attribution needs of one image of the prompt (what the engine keeps per image).

    image_features: (V*N, D) the visual tokens as spliced into the prompt, projector(x + mined).
    attn: (V, N, P*P) the mining weights (`Encoded.attn[0]`).
    image_features_no_mining: (V*N, D) projector(x), from `encode_images(..., mining=False)`; None skips the
        mining ablation for the whole answer (prob_no_mining is then None).
    """
    image_features: torch.Tensor
    attn: torch.Tensor
    image_features_no_mining: torch.Tensor | None = None


@dataclass
class ImageAttribution:
    """One image's share of an answer's attribution."""
    relevance: torch.Tensor   # float32 (A, V, N): each answer token's relevance of each visual token
    hr_map: torch.Tensor      # float32 (A, V, n*P, n*P): relevance carried down to HR pixels, per view

    def answer_map(self, tokens=None) -> torch.Tensor:
        """(V, n*P, n*P) float32: the mean of the maps of `tokens` (indices; default: the whole answer)."""
        sel = self.hr_map if tokens is None else self.hr_map[_as_index(tokens, self.hr_map.device)]
        return sel.mean(0)


@dataclass
class Attribution:
    """Result of `explain_answer` for one answer of A tokens.

    images: one entry per image slot of the prompt, in order.
    prob: float32 (A,) each answer token's teacher-forced probability with the visual tokens as given.
    prob_no_mining: float32 (A,) the same with projector(x) for every image (the mining ablation), or None.
    image_share: float32 (A,) the attention (or relevancy) mass of each answer token on all visual tokens
        together, from the same pass: how much it drew on the images at all.
    """
    answer_ids: list[int]
    method: str
    layers: tuple[int, int]
    images: list[ImageAttribution]
    prob: torch.Tensor
    prob_no_mining: torch.Tensor | None
    image_share: torch.Tensor


def image_positions(input_ids, token_counts: Sequence[int]) -> list[torch.Tensor]:
    """Positions in the embedded sequence (`MiniGemini.embed`) of each image's visual tokens.

    Args:
        input_ids: prompt ids with one IMAGE_TOKEN_INDEX per image; token_counts: T per image, in order.
    Returns: one (T_k,) long tensor per image.
    Raises: ValueError when the slots and counts differ in number.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
    slots = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    if len(slots) != len(token_counts):
        raise ValueError(f"The prompt has {len(slots)} image slots but {len(token_counts)} images were given")
    out, shift = [], 0
    for slot, t in zip(slots, token_counts):
        out.append(torch.arange(slot + shift, slot + shift + t))
        shift += t - 1
    return out


def _answer_probs(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(-1).gather(-1, answer[:, None])[:, 0]


def explain_answer(model, input_ids, images: Sequence[ImageEvidence], answer_ids, *,
                   method: str = "attention", layers: tuple[int, int] | None = None) -> Attribution:
    """Attribute an answer to the visual tokens and HR pixels of every image of its prompt, and ablate mining.

    Args:
        model: the `MiniGemini`.
        input_ids: the prompt's token ids with one IMAGE_TOKEN_INDEX (-200) per image (as generation saw it).
        images: one `ImageEvidence` per slot, in order.
        answer_ids: the A answer token ids as generated (A >= 1).
        method: "attention" (answer rows of each layer's attention, mean over heads and the layer range) or
            "relevancy" (Chefer et al.'s gradient-weighted rule: a backward per answer token, see
            `answer_relevancy` for the sizes it affords).
        layers: [start, stop) LLM layers; default `default_layers(num_layers, method)`.

    Returns:
        `Attribution` (per image: relevance (A, V, N) and hr_map (A, V, n*P, n*P), float32 on CPU).
    Cost: method="attention": one forward over prompt + answer, as long as one prefill of the conversation
    (`python -m mini_gemini.bench_attribution`); the ablation adds one more forward without gradient;
    "relevancy": see `answer_relevancy`.

    Raises:
        ValueError: unknown method, bad layer range, empty answer, or images that do not match the slots.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose from {', '.join(METHODS)}")
    answer = torch.as_tensor(answer_ids, dtype=torch.long).flatten()
    if len(answer) == 0:
        raise ValueError("there is no answer to attribute (no answer tokens)")
    llm = model.llm
    n_layers = llm.config.num_hidden_layers
    layers = _check_layers(layers if layers is not None else default_layers(n_layers, method), n_layers)
    ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
    counts = [len(im.image_features) for im in images]
    spans = image_positions(ids, counts)
    sequence = torch.cat([ids, answer[:-1]])       # the last answer token is read, never fed
    with torch.no_grad():
        embeds = model.embed(sequence, [im.image_features for im in images])
    prompt_len = embeds.shape[1] - (len(answer) - 1)
    rows = torch.arange(prompt_len - 1, prompt_len - 1 + len(answer))
    columns = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
    if method == "attention":
        attn, logits = answer_attention(llm, embeds, rows, columns, layers)
        rel = attn.mean((0, 1))                                            # (A, K)
    else:
        rel, logits = answer_relevancy(llm, embeds, rows, columns, answer.to(embeds.device), layers)
    rel = rel.float().cpu()
    prob = _answer_probs(logits, answer.to(logits.device)).cpu()
    no_mining = None
    if images and all(im.image_features_no_mining is not None for im in images):
        with torch.no_grad():
            plain = model.embed(sequence, [im.image_features_no_mining for im in images])
            out = llm(inputs_embeds=plain, logits_to_keep=rows.to(plain.device), use_cache=False)
        no_mining = _answer_probs(out.logits[0], answer.to(out.logits.device)).cpu()
    results, off = [], 0
    for im, t in zip(images, counts):
        a = torch.as_tensor(im.attn, dtype=torch.float32).cpu()
        r = rel[:, off:off + t].reshape(len(answer), a.shape[0], a.shape[1])
        results.append(ImageAttribution(r, hr_maps(r, a)))
        off += t
    return Attribution(answer.tolist(), method, layers, results, prob, no_mining, rel.sum(-1))
