"""The model behind one lock: image encoding, prompt embedding, the packed forward of a scheduler step, and a
whole answer with the LLM's own `generate`.

Only one model run happens at a time (`lock`): an image encoding, one scheduler step, or one whole `generate`.
Image encodings that wait for the model are counted, so that a scheduler lets them in between two steps
instead of making them wait for every answer being written.

The packed forward runs the LLM once over several requests packed into one sequence: each newcomer's prompt
suffix and one token for every request already decoding. Linear layers, norms and the MLP see all the tokens
at once; attention is computed per request over its own cache (`ragged_attention`, no padding, no copies),
with its own positions and causal / sliding-window mask.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from ..modeling.model import sampling_kwargs

RAGGED = "mgm_ragged"   # the attention implementation name used during packed steps
ENCODE_TURN_S = 0.05    # how long a scheduler waits between two steps for a waiting image encoding to take over
_local = threading.local()


class EncodedImage(NamedTuple):
    tokens: torch.Tensor   # (V*N, D) visual tokens, on the model's device, in the LLM's dtype
    attn: torch.Tensor     # (V, N, P*P) mining weights, float32 on CPU
    gain: torch.Tensor     # (V, N) mining gain per LR token, float32 on CPU
    lr_features: torch.Tensor | None = None  # (V*N, C) the LR tokens before mining (for the mining ablation)


@dataclass
class StepInput:
    """One request's part of a packed step.

    cache: the request's own cache (its new keys/values are appended to it);
    pos: positions the cache holds (the absolute position of the first input);
    embeds: (n, D) prompt embeddings not yet in the cache, or None while decoding;
    token: the token to feed while decoding (the last one written).
    """
    cache: DynamicCache
    pos: int
    embeds: torch.Tensor | None = None
    token: int | None = None

    @property
    def length(self) -> int:
        return self.embeds.shape[0] if self.embeds is not None else 1


def ragged_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of a packed step: each request's queries against its own cache only.

    query: (1, H, T, d) for all packed tokens; the keys and values each request attends to were handed over by
    `_Packed.update` (its cache with its new tokens appended). Returns ((1, T, H, d), None) as transformers'
    attention functions do."""
    packed: _Packed | None = getattr(_local, "packed", None)
    if packed is None:  # not inside a packed step (should not happen): plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    window = kwargs.pop("sliding_window", None)
    outs = []
    for (off, n), pos, (k, v) in zip(packed.spans, packed.positions, packed.kv[module.layer_idx]):
        q = query[:, :, off:off + n]
        mask = None
        if n == 1:
            if window and k.shape[2] > window:
                k, v = k[:, :, -window:], v[:, :, -window:]
        elif k.shape[2] != n or (window and n > window):
            # prompt suffix after cached tokens: causal mask by absolute positions (and the window)
            qpos = torch.arange(pos, pos + n, device=q.device)[:, None]
            kpos = torch.arange(pos + n - k.shape[2], pos + n, device=q.device)[None, :]
            allowed = kpos <= qpos
            if window:
                allowed &= (qpos - kpos) < window
            mask = allowed[None, None]
        out, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None


AttentionInterface.register(RAGGED, ragged_attention)


class _Packed:
    """What the model sees as its cache during a packed step: every request's own DynamicCache; `update`
    appends each request's slice of the new keys/values to its cache and keeps the result for attention."""
    is_compileable = False

    def __init__(self, caches, spans, positions):
        self.caches, self.spans, self.positions = caches, spans, positions
        self.kv: dict[int, list] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = [c.update(key_states[:, :, off:off + n], value_states[:, :, off:off + n], layer_idx)
                              for c, (off, n) in zip(self.caches, self.spans)]
        return key_states, value_states


class ModelRunner:
    """Runs the model for the chat engine, one run at a time.

    Args:
        model: a `MiniGemini` (as `load_pretrained` returns it).
    """

    def __init__(self, model):
        self.model = model
        self.lock = threading.Lock()        # one model run at a time
        self._waiting = 0                   # image encodings waiting for the lock
        self._count_lock = threading.Lock()
        # The LLM attends with sdpa, and with `ragged_attention` during packed steps. Switching costs a walk over
        # all its modules (~0.1 ms), so packed mode stays on while a scheduler is busy (nothing else runs the
        # LLM then: every run goes through this runner) and is switched off by `end_packed` or any other run.
        self._packed_mode = False
        if hasattr(model, "llm") and model.llm is not None:
            model.llm.set_attn_implementation("sdpa")

    # ---- images ----------------------------------------------------------------------------------------------
    def encode(self, pil) -> EncodedImage:
        """One PIL image -> its visual tokens and mining maps (`EncodedImage`). Takes the model between two
        scheduler steps: answers being written pause for one encoding."""
        views = self.model.processor.images(pil)
        with self._count_lock:
            self._waiting += 1
        try:
            with self.lock, torch.no_grad():
                enc = self.model.encode_images(views.pixel_values[None], views.pixel_values_aux[None])
        finally:
            with self._count_lock:
                self._waiting -= 1
        return EncodedImage(enc.image_features[0], enc.attn[0].float().cpu(), enc.gain[0].float().cpu(),
                            enc.lr_features[0])

    def explain(self, prompt_ids: list[int], images: list, answer_ids: list[int], method: str = "attention",
                layers: tuple[int, int] | None = None, ablation: bool = True):
        """Answer attribution (`modeling.attribution.explain_answer`) in one extra pass over the conversation, under
        the model's lock (never on a decoding step). `images`: the prompt's `ImageEntry`s in slot order; with
        `ablation`, the mining ablation (a second forward) uses projector(x) of their LR tokens when they kept them."""
        from ..modeling.attribution import ImageEvidence, explain_answer
        with self.lock:
            self.end_packed()
            evidence = [ImageEvidence(im.tokens, im.attn, None if im.lr_features is None or not ablation else
                                      self._project(im.lr_features, im.tokens.dtype)) for im in images]
            return explain_answer(self.model, prompt_ids, evidence, answer_ids, method=method, layers=layers)

    def unmined_tokens(self, lr_features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """projector(x): the visual tokens of an image without its mined detail (the mining ablation), from its LR
        tokens `lr_features` (V*N, C); (V*N, D) in `dtype` on the model's device. Under the model's lock."""
        with self.lock:
            return self._project(lr_features, dtype)

    def _project(self, lr_features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        projector = self.model.mm_projector
        p = next(projector.parameters())
        with torch.no_grad():
            return projector(lr_features.to(p.device, p.dtype)).to(dtype)

    def let_encoders_in(self) -> None:
        """Called by a scheduler between two steps (not holding the lock): wait up to ENCODE_TURN_S while an
        image encoding waits for the model and has not taken it yet."""
        if not self._waiting:
            return
        deadline = time.monotonic() + ENCODE_TURN_S
        while self._waiting and not self.lock.locked() and time.monotonic() < deadline:
            time.sleep(0.0005)

    # ---- text ------------------------------------------------------------------------------------------------
    def embed(self, ids, image_tokens) -> torch.Tensor:
        """(L, D) prompt embeddings with the visual tokens spliced in (`MiniGemini.embed`)."""
        return self.model.embed(ids, image_tokens)[0]

    def forward(self, batch: list[StepInput]) -> torch.Tensor:
        """One packed forward of the LLM over `batch` (the caller holds `lock`). Each request's new keys and
        values are appended to its cache.

        Returns:
            (len(batch), vocab) float32 logits of each request's last input position.
        Raises:
            whatever the model raises; caches may then hold part of the step (see `kv_store.rollback`).
        """
        llm = self.model.llm
        device = self.model.device
        spans, off = [], 0
        for r in batch:
            spans.append((off, r.length))
            off += r.length
        positions = [r.pos for r in batch]
        pos_ids = torch.cat([torch.arange(p, p + n) for p, (_, n) in zip(positions, spans)])[None].to(device)
        if all(r.embeds is None for r in batch):  # decoding only: token ids, as generate feeds them
            inputs = dict(input_ids=torch.tensor([[r.token for r in batch]], device=device))
        else:
            embed = llm.get_input_embeddings()
            parts = [r.embeds if r.embeds is not None else embed(torch.tensor([r.token], device=device))
                     for r in batch]
            inputs = dict(inputs_embeds=torch.cat(parts)[None])
        packed = _Packed([r.cache for r in batch], spans, positions)
        keep = torch.tensor([o + n - 1 for o, n in spans], device=device)
        if not self._packed_mode:
            llm.set_attn_implementation(RAGGED)
            self._packed_mode = True
        _local.packed = packed
        try:
            out = llm(**inputs, position_ids=pos_ids, cache=packed, use_cache=True, logits_to_keep=keep)
        finally:
            _local.packed = None
        return out.logits[0].float()

    def end_packed(self) -> None:
        """Back to plain sdpa attention (a scheduler going idle, or before any other run of the LLM); the caller
        holds `lock`."""
        if self._packed_mode:
            self.model.llm.set_attn_implementation("sdpa")
            self._packed_mode = False

    def generate(self, embeds: torch.Tensor, cache: DynamicCache, *, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int | None, eos_token_id: list[int], pad_token_id: int | None,
                 suppress_tokens=(), streamer=None, stopping_criteria=None) -> list[int]:
        """A whole answer with the LLM's own `generate` (the caller holds `lock`), continuing `cache` (which holds
        the first positions of `embeds` (L, D) already). Returns the new token ids."""
        self.end_packed()
        if seed is not None:
            torch.manual_seed(seed)
        extra = dict(suppress_tokens=list(suppress_tokens)) if suppress_tokens else {}
        out = self.model.llm.generate(
            inputs_embeds=embeds[None], attention_mask=torch.ones((1, embeds.shape[0]), dtype=torch.long,
                                                                  device=embeds.device),
            cache=cache, max_new_tokens=max_new_tokens, eos_token_id=list(eos_token_id),
            pad_token_id=pad_token_id, streamer=streamer, stopping_criteria=stopping_criteria,
            **sampling_kwargs(temperature, top_p), **extra)
        return out[0].tolist()  # with inputs_embeds, generate returns the new tokens only
