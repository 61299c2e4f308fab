"""Token sequences of the Z-Image DiT: patchify, padding to multiples of 32, RoPE positions, masks.

Layout per batch item i (as in diffusers, which is the reference for every detail here):
- image tokens: (H/2)*(W/2) patches, padded to a multiple of 32 (pads become `x_pad_token`);
  position (Lp_i + 1, h, w) where Lp_i is item i's padded caption length; image pads (0, 0, 0).
- caption tokens: padded to Lp_i = multiple of 32 (pads become `cap_pad_token`); position (1 + j, 0, 0)
  for every j < Lp_i, pads included.
- the main layers see [image tokens, caption tokens] of each item. Items whose total lengths differ are
  right-padded with zeros and a key mask; when all items have the same length there is no mask at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zimage_lite.config import DiTConfig


def _round_up(n: int, m: int) -> int:
    return n + (-n) % m


def rope_freqs(positions: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """positions: int (..., 3) -> complex64 (..., sum(axes_dims)/2).

    Angles are formed in float64 and rounded to float32 before `polar`, exactly like diffusers' table.
    """
    parts = []
    for axis, dim in enumerate(axes_dims):
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim))
        angles = (positions[..., axis].to(torch.float64)[..., None] * inv).float()
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=-1)


def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), features ordered (ph, pw, c) as the x_embedder expects."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, shape: torch.Size, p: int) -> torch.Tensor:
    """(B, H/p * W/p, p*p*C) -> (B, C, H, W); inverse of `patchify`."""
    b, c, h, w = shape
    x = tokens.reshape(b, h // p, w // p, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def _pad_right(items: list[torch.Tensor], length: int) -> torch.Tensor:
    """Stack (L_i, ...) tensors into (B, length, ...), zero-filled on the right."""
    out = items[0].new_zeros((len(items), length, *items[0].shape[1:]))
    for i, item in enumerate(items):
        out[i, : item.shape[0]] = item
    return out


def _key_mask(lengths: list[int], device: torch.device) -> torch.Tensor | None:
    if len(set(lengths)) == 1:
        return None
    n = max(lengths)
    return torch.arange(n, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


@dataclass
class Sequences:
    image_patches: torch.Tensor  # (B, Ni_pad, p*p*C), pads hold copies of the last patch
    image_pad: torch.Tensor  # bool (B, Ni_pad): True where x_pad_token goes
    image_freqs: torch.Tensor  # complex64 (B, Ni_pad, head_dim/2)
    image_len: int  # real image tokens per item
    caption_feats: torch.Tensor  # (B, Lmax, cap_dim)
    caption_pad: torch.Tensor  # bool (B, Lmax)
    caption_freqs: torch.Tensor  # complex64 (B, Lmax, head_dim/2)
    caption_mask: torch.Tensor | None  # bool (B, Lmax) valid keys, None if all items equal
    caption_lens: list[int]  # padded caption length per item
    joint_freqs: torch.Tensor  # complex64 (B, Ni_pad + Lmax_i, head_dim/2)
    joint_mask: torch.Tensor | None

    def join(self, image: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        """[image tokens, caption tokens] per item: (B, Ni_pad, D), (B, Lmax, D) -> (B, S, D)."""
        if self.joint_mask is None:
            return torch.cat([image, caption[:, : self.caption_lens[0]]], dim=1)
        items = [torch.cat([image[i], caption[i, :n]]) for i, n in enumerate(self.caption_lens)]
        return _pad_right(items, max(x.shape[0] for x in items))


def build_sequences(cfg: DiTConfig, latents: torch.Tensor, captions: list[torch.Tensor]) -> Sequences:
    p, m, dev = cfg.patch_size, cfg.seq_multiple, latents.device
    b, _, h, w = latents.shape
    if len(captions) != b:
        raise ValueError(f"{len(captions)} captions for a batch of {b} latents")
    empty = [i for i, c in enumerate(captions) if c.shape[0] == 0]
    if empty:  # diffusers fails here too (a reshape in its RoPE); there is nothing to condition on
        raise ValueError(f"caption {empty[0]} has no tokens: the DiT needs at least one caption token")
    ht, wt = h // p, w // p
    n_img = ht * wt
    n_img_pad = _round_up(n_img, m)

    patches = patchify(latents, p)
    patches = torch.cat([patches, patches[:, -1:].expand(b, n_img_pad - n_img, -1)], dim=1)
    image_pad = (torch.arange(n_img_pad, device=dev) >= n_img).expand(b, -1)

    cap_lens = [_round_up(c.shape[0], m) for c in captions]
    # caption pads repeat the last real feature (replaced by cap_pad_token after embedding)
    padded = [torch.cat([c, c[-1:].expand(n - c.shape[0], -1)]) for c, n in zip(captions, cap_lens)]
    l_max = max(cap_lens)
    caption_feats = _pad_right(padded, l_max)
    caption_pad = torch.stack(
        [
            (torch.arange(l_max, device=dev) >= c.shape[0]) & (torch.arange(l_max, device=dev) < n)
            for c, n in zip(captions, cap_lens)
        ]
    )

    grid_h, grid_w = torch.meshgrid(torch.arange(ht, device=dev), torch.arange(wt, device=dev), indexing="ij")
    image_freqs, caption_freqs, joint_freqs = [], [], []
    for n_cap in cap_lens:
        img_pos = torch.zeros(n_img_pad, 3, dtype=torch.long, device=dev)
        img_pos[:n_img, 0] = n_cap + 1
        img_pos[:n_img, 1] = grid_h.flatten()
        img_pos[:n_img, 2] = grid_w.flatten()
        cap_pos = torch.zeros(n_cap, 3, dtype=torch.long, device=dev)
        cap_pos[:, 0] = torch.arange(1, n_cap + 1, device=dev)
        fi = rope_freqs(img_pos, cfg.axes_dims, cfg.rope_theta)
        fc = rope_freqs(cap_pos, cfg.axes_dims, cfg.rope_theta)
        image_freqs.append(fi)
        caption_freqs.append(fc)
        joint_freqs.append(torch.cat([fi, fc]))
    joint_lens = [n_img_pad + n for n in cap_lens]
    return Sequences(
        image_patches=patches,
        image_pad=image_pad,
        image_freqs=torch.stack(image_freqs),
        image_len=n_img,
        caption_feats=caption_feats,
        caption_pad=caption_pad,
        caption_freqs=_pad_right(caption_freqs, l_max),
        caption_mask=_key_mask(cap_lens, dev),
        caption_lens=cap_lens,
        joint_freqs=_pad_right(joint_freqs, max(joint_lens)),
        joint_mask=_key_mask(joint_lens, dev),
    )
