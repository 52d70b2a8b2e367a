"""Token merging for the cache (token mode ``merge:K``): P patch tokens -> K merged tokens per image.

The CLS token is kept as it is (size 1). The P patch tokens of one block (or aggregate) are merged
in rounds of ToMe's bipartite soft matching (Bolya et al., ICLR 2023; facebookresearch/ToMe
``tome/merge.py``): the current tokens, in raster order of their first patch, are split
alternately into sets A (even positions) and B (odd positions); every A token finds its
best-scoring B token; the ``r`` A tokens with the highest best scores are merged into their B
partners (several may land on one), the rest stay. A round removes ``r = min(n - K, n // 2)``
tokens (ToMe's at most 50% per step), so ``P -> K`` takes about log2(P / K) rounds. Merged tokens
are size-weighted means: at the end each output token is recomputed as the exact mean of the
original patch tokens assigned to it, so ``sum(size * token) == sum(original tokens)`` and the sizes
add up to the number of tokens T = 1 + P.

The merge score is MLIP-inspired (Zhang et al., ICML 2024: merging "guided by comprehensive
semantics from the frequency and spatial domains" with a controllable compression rate). MLIP's
public text gives no formula, so this module's own choice, exactly:

    score(a, b) = cos(x_a, x_b) - W_DISTANCE * |c_a - c_b| / max(H, W) - W_FREQUENCY * (f_a + f_b) / 2

- spatial domain: ``cos`` is the cosine similarity of the current (size-weighted mean) token
  features, the ToMe metric computed on the block's output tokens (ToMe uses the attention keys,
  which a cache of block outputs does not hold); ``c`` is a token's size-weighted centroid on the
  (H, W) patch grid, so merges stay local;
- frequency domain: ``f_p`` is the high-frequency share of original patch p: the patch-token map
  (H, W, C) goes through a 2-D FFT over the grid, frequencies with radius <= ``LOW_PASS`` of the
  Nyquist radius are kept as the low-pass image, and ``f_p = |X_p - lowpass(X)_p| / |X_p|``,
  divided by its maximum over the image so it lies in [0, 1]. A merged token's ``f`` is the
  size-weighted mean of its members'. Tokens that carry edges and texture (high-frequency content,
  which the spatial similarity alone under-weights) are therefore merged last.

Output tokens are ordered by their first (lowest raster index) patch; ``sizes[:, 0]`` is the CLS.
"""

from __future__ import annotations

import torch

W_DISTANCE = 0.5
W_FREQUENCY = 0.5
LOW_PASS = 0.25


def high_frequency_share(patches: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(B, P, C) patch tokens in raster order -> (B, P) high-frequency share in [0, 1] (see module doc)."""
    b, p, c = patches.shape
    h, w = grid_hw
    x = patches.float().reshape(b, h, w, c)
    spec = torch.fft.fft2(x, dim=(1, 2))
    fy = torch.fft.fftfreq(h, device=x.device)[:, None]
    fx = torch.fft.fftfreq(w, device=x.device)[None, :]
    radius = torch.sqrt(fy**2 + fx**2) / (0.5 * 2**0.5)  # 1 = the corner (Nyquist in both axes)
    low = torch.fft.ifft2(spec * (radius <= LOW_PASS)[None, :, :, None], dim=(1, 2)).real
    share = (x - low).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)
    share = share.reshape(b, p)
    return share / share.amax(dim=1, keepdim=True).clamp_min(1e-12)


def merge_assignment(patches: torch.Tensor, grid_hw: tuple[int, int], k: int) -> torch.Tensor:
    """(B, P, C) patch tokens -> (B, P) long: the merged token (0..k-1) each patch belongs to."""
    b, p, c = patches.shape
    h, w = grid_hw
    if not 1 <= k < p:
        raise ValueError(f"merge:{k} needs 1 <= K < {p} patches")
    dev = patches.device
    rows = torch.arange(b, device=dev)[:, None]
    feats = patches.float()
    size = torch.ones(b, p, device=dev)
    pos = torch.stack(torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij"), -1)
    pos = pos.reshape(1, p, 2).float().expand(b, p, 2)
    freq = high_frequency_share(patches, grid_hw)
    first = torch.arange(p, device=dev).expand(b, p)  # lowest raster index of each token's patches
    owner = torch.arange(p, device=dev).expand(b, p).clone()  # patch -> current token
    # token state carried as size-weighted sums, so merging is a scatter-add
    s_feat, s_pos, s_freq = feats * size[..., None], pos * size[..., None], freq * size
    n = p
    while n > k:
        r = min(n - k, n // 2)
        a, bb = torch.arange(0, n, 2, device=dev), torch.arange(1, n, 2, device=dev)
        mean = s_feat / size[..., None]
        unit = mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cen = s_pos / size[..., None]
        fr = s_freq / size
        score = unit[:, a] @ unit[:, bb].transpose(1, 2)
        score = score - W_DISTANCE * torch.cdist(cen[:, a], cen[:, bb]) / max(h, w)
        score = score - W_FREQUENCY * (fr[:, a, None] + fr[:, None, bb]) / 2
        best, partner = score.max(dim=-1)  # (B, |A|)
        order = best.argsort(dim=-1, descending=True, stable=True)
        src = order[:, :r]  # A positions merged away
        keep_a = order[:, r:].sort(dim=-1).values
        # new token list: kept A tokens, then all B tokens; A tokens merged into a B go to its slot
        n_keep = keep_a.shape[1]
        new_index = torch.empty(b, n, dtype=torch.long, device=dev)
        new_index[rows, a[keep_a]] = torch.arange(n_keep, device=dev).expand(b, n_keep)
        new_index[:, bb] = n_keep + torch.arange(len(bb), device=dev)
        new_index[rows, a[src]] = n_keep + partner.gather(1, src)
        m = n - r

        def gather_sum(x: torch.Tensor) -> torch.Tensor:
            shape = (b, m, *x.shape[2:])
            idx = new_index.view(b, n, *([1] * (x.dim() - 2))).expand_as(x)
            return torch.zeros(shape, device=dev, dtype=x.dtype).scatter_add_(1, idx, x)

        s_feat, s_pos, s_freq, size = gather_sum(s_feat), gather_sum(s_pos), gather_sum(s_freq), gather_sum(size)
        first = torch.full((b, m), p, device=dev, dtype=torch.long).scatter_reduce_(1, new_index, first, "amin")
        owner = new_index.gather(1, owner)
        # back to raster order of each token's first patch, so A/B alternate over the image
        perm = first.argsort(dim=1)
        inverse = perm.argsort(dim=1)
        s_feat, s_pos = s_feat.gather(1, perm[..., None].expand_as(s_feat)), s_pos.gather(1, perm[..., None].expand_as(s_pos))
        s_freq, size, first = s_freq.gather(1, perm), size.gather(1, perm), first.gather(1, perm)
        owner = inverse.gather(1, owner)
        n = m
    return owner


def merge_tokens(
    cls_tok: torch.Tensor, patches: torch.Tensor, grid_hw: tuple[int, int], k: int,
    assignment: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, C) CLS + (B, P, C) patches -> (B, 1 + k, C) tokens and (B, 1 + k) int sizes.

    ``assignment`` (B, P) reuses a merge computed elsewhere; by default it is computed from
    ``patches`` with :func:`merge_assignment`.
    """
    b, p, c = patches.shape
    owner = merge_assignment(patches, grid_hw, k) if assignment is None else assignment
    x = patches.float()
    sums = torch.zeros(b, k, c, device=x.device).scatter_add_(1, owner[..., None].expand(b, p, c), x)
    counts = torch.zeros(b, k, device=x.device).scatter_add_(1, owner, torch.ones(b, p, device=x.device))
    merged = (sums / counts[..., None]).to(patches.dtype)
    sizes = torch.cat([torch.ones(b, 1, device=x.device), counts], dim=1).round().to(torch.int32)
    return torch.cat([cls_tok, merged], dim=1), sizes
