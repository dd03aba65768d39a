"""Patch info mining: each low-resolution token attends to its own window of the high-resolution map.

With x an LR token (width C) and h_j the HR feature vectors (width C_aux) of its P x P window:

    q = Linear(LN(x)),  k_j = Linear(LN(h_j)),  v_j = Linear(LN(h_j))
    a = softmax_j(q . k_j / sqrt(C)),  token = x + sum_j a_j v_j

The token count is unchanged; `a` is what the mining heatmap shows, so it is returned as is.
"""
import math

import torch
from torch import nn

CHUNK_TOKENS = 64  # LR tokens mined at once (whole rows of the LR grid): bounds the window temporaries
# (tokens x P*P x C_aux, copied, then normalised): at MGM's 768 px that is 576 x 64 x 2880 floats = 425 MB each
# for all tokens at once, 71 MB per 48 tokens. Every token's result is computed exactly as before.


def windows(hr: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C_aux, rows*P, side*P) HR map -> (B, rows*side, P*P, C_aux): the P x P window under each LR token
    of `rows` rows of a `side`-wide LR grid (rows = side for the whole map).

    Tokens are row-major over the LR grid, candidates row-major inside their window.
    """
    b, c, h, w = hr.shape
    p = w // side
    rows = h // p
    x = hr.permute(0, 2, 3, 1).reshape(b, rows, p, side, p, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, rows * side, p * p, c)


class PatchInfoMining(nn.Module):
    """Patch info mining (MGM paper, section 3.1; DESIGN.md 1.2): each LR token attends to its own P x P
    window of the HR feature map and adds what it finds.

    q = Linear(LN(x)), k_j / v_j = Linear(LN(h_j)); a = softmax_j(q . k_j / sqrt(C)); out = x + sum_j a_j v_j.

    Args:
        dim: C, the LR token width (CLIP's hidden size, 1024).
        aux_dim: the HR feature width (2880 = the four ConvNeXt stages concatenated).
    """

    def __init__(self, dim: int, aux_dim: int):
        super().__init__()
        # Names and order (0 = LayerNorm, 1 = Linear) follow the checkpoints' vlm_uni_*_projector.
        self.query = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.key = nn.Sequential(nn.LayerNorm(aux_dim), nn.Linear(aux_dim, dim))
        self.value = nn.Sequential(nn.LayerNorm(aux_dim), nn.Linear(aux_dim, dim))

    def forward(self, x: torch.Tensor, hr: torch.Tensor):
        """x: (B, N, C) LR tokens; hr: (B, C_aux, H, W) with H = W = P * sqrt(N).

        Returns the mined tokens (B, N, C) and the attention weights (B, N, P*P). The tokens are mined
        CHUNK_TOKENS at a time (whole LR rows), which bounds the memory of the windows, not the result.
        """
        side = math.isqrt(x.shape[1])
        p = hr.shape[-1] // side
        step = max(1, CHUNK_TOKENS // side)                 # LR rows per chunk
        q = self.query(x).unsqueeze(2)                      # (B, N, 1, C)
        mined, attn = [], []
        for r in range(0, side, step):
            cand = windows(hr[:, :, r * p:(r + step) * p].to(x.dtype), side)  # (B, n, P*P, C_aux)
            k = self.key(cand)                              # (B, n, P*P, C)
            v = self.value(cand)
            # Scale the keys before the product, as the reference does, so fp16/bf16 results match it.
            logits = (q[:, r * side:(r + step) * side] @ (k.transpose(-1, -2) / math.sqrt(k.shape[-1]))).nan_to_num()
            a = logits.softmax(-1)                          # (B, n, 1, P*P)
            mined.append((a @ v).squeeze(2))
            attn.append(a.squeeze(2))
        return x + torch.cat(mined, 1), torch.cat(attn, 1)
