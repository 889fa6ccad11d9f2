"""`randar`: RandAR-style random-order generation of the K merged ids (MergeVQ §4.2, path c).

The K merged tokens of an image sit on a canonical √K×√K slot grid (the tokenizer's canonical order: sorted by
the first raster position each group covers). Training feeds [class, PI(o_0), x_{o_0}, PI(o_1), x_{o_1}, ...,
PI(o_{K-1})] for a fresh random permutation o per sample; a position-instruction token PI(s) is one learned
vector rotated by the 2D RoPE of slot s, and the output at PI(o_k) predicts x_{o_k}. Both PI(s) and x_s carry
slot s's RoPE position.

Decoding: sequentially (one token per step, exactly the teacher-forced layout) or in parallel with RandAR's
cosine schedule: a step that decoded n tokens feeds [x_0, PI_1, x_1, ..., PI_{n-1}, x_{n-1}] after the cached
PI_0, then the next step's m position instructions, so the cache always equals the training layout. The source
recovery model of the tokenizer then predicts `assign`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.gpt import GPTConfig, Logits
from ..nn.rope import apply_rope
from .base import Generator, Sampled, register
from .noise import ORDER_STREAM, SampleNoise
from .sampling import Pick, randar_schedule

__all__ = ["RandAR", "default_steps"]


def default_steps(k: int) -> int:
    """RandAR's step counts: 88 for 256 tokens (RandAR-L), 64 for 144 (MergeVQ G+R); ≈ 0.34·K in between,
    never more than K."""
    table = {256: 88, 144: 64}
    return table.get(k, max(1, min(k, round(0.34 * k + 3))))


@register
class RandAR(Generator):
    """RandAR over the K merged ids in random slot order; `assign` comes from the tokenizer's source recovery model."""

    name = "randar"
    needs_source_recovery = True
    default_cfg_schedule = "linear"  # the paper: "CFG with a linear sampling schedule" for RandAR (A.2)

    def __init__(self, gpt_cfg: GPTConfig, default_tokens: int | None = None, prefix_rope: str = "identity") -> None:
        super().__init__(gpt_cfg, prefix_rope)
        self.pi = nn.Parameter(torch.randn(gpt_cfg.dim) * 0.02)
        self.default_tokens = default_tokens

    def options(self) -> dict[str, Any]:
        return {**super().options(), "default_tokens": self.default_tokens}

    def default_k(self) -> int:
        return self.default_tokens or self.n_tokens

    def check_steps(self, steps: int | None, k: int) -> int:
        """Parallel decoding steps for K tokens: `default_steps(k)` when None, else 1..K."""
        steps = steps or default_steps(k)
        if not 1 <= steps <= k:
            raise ConfigError(f"--steps {steps}: randar decodes K={k} tokens in 1..{k} steps")
        return steps

    def seq_len(self, k: int) -> int:
        return k

    @property
    def train_sequence_len(self) -> int:
        return 2 * self.n_tokens  # [class, PI_0, x_0, ..., PI_{N-1}] at K = N

    def targets_count(self, batch: dict[str, Tensor]) -> int:
        return int(batch["k"].sum())

    # ---------------------------------------------------------------- layout
    @staticmethod
    def slot_positions(slots: Tensor, side: Tensor) -> tuple[Tensor, Tensor]:
        """Slots (B, L) on grids of side (B,) -> rows, cols (B, L)."""
        side = side[:, None]
        return slots // side, slots % side

    def pi_embeds(self, cos: Tensor, sin: Tensor) -> Tensor:
        """Position instructions for rotations cos, sin (B, L, D/2) -> (B, L, C): the learned vector, viewed as
        (heads, head dim), rotated like a key at that position."""
        B, L = cos.shape[:2]
        p = rearrange(self.pi, "(h d) -> 1 h 1 d", h=self.cfg.heads).expand(B, -1, L, -1)
        return rearrange(apply_rope(p, cos, sin), "b h l d -> b l (h d)")

    def teacher_logits(self, ids: Tensor, k: Tensor, labels: Tensor, order: Tensor) -> tuple[Logits, Tensor]:
        """ids (B, Kmax) merged ids in slot order (padding -1), k (B,), labels (B,), order (B, Kmax) the slot decoded
        at each step (padding steps point at padding slots). Returns logits at the PI positions (B, Kmax, ...)
        and the targets in decoding order (B, Kmax), -100 at padding."""
        h, targets = self.teacher_hidden(ids, k, labels, order)
        return self.gpt.logits(h, targets.clamp_min(0)), targets

    def teacher_hidden(self, ids: Tensor, k: Tensor, labels: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
        """`teacher_logits` before the output head: the trunk's hidden states at PI_0 .. PI_{K-1} (B, Kmax, C) and
        the targets. `gpt.sample_ids` on them draws each slot's id as decoding would, given the true ids decoded
        before it in `order` (source recovery fine-tuning feeds such ids to the recovery model)."""
        B, Kmax = ids.shape
        side = k.float().sqrt().round().long().clamp_min(1)
        x_ord = ids.gather(1, order)  # (B, Kmax)
        pad = torch.arange(Kmax, device=ids.device)[None] >= k[:, None]
        targets = torch.where(pad, torch.full_like(x_ord, -100), x_ord)
        rows, cols = self.slot_positions(order, side)
        cos, sin = self.gpt.rope(rows, cols)  # (B, Kmax, D/2)
        pis = self.pi_embeds(cos, sin)
        toks = self.gpt.embed_ids(x_ord.clamp_min(0))
        inter = torch.stack([pis, toks], dim=2).flatten(1, 2)[:, :-1]  # PI_0, x_0, ..., PI_{K-1}: (B, 2K-1, C)
        x = torch.cat([self.gpt.embed_class(labels)[:, None], inter], dim=1)  # (B, 2K, C)
        rc = torch.stack([cos, cos], 2).flatten(1, 2)[:, :-1]
        rs = torch.stack([sin, sin], 2).flatten(1, 2)[:, :-1]
        one, zero = self.prefix_angles(1, ids.device)
        cos_all = torch.cat([one.expand(B, 1, -1), rc], 1)
        sin_all = torch.cat([zero.expand(B, 1, -1), rs], 1)
        h = self.gpt.trunk(x, cos_all, sin_all)[:, 1::2]  # outputs at PI_0 .. PI_{K-1}
        return h, targets

    @staticmethod
    def random_order(k: Tensor, kmax: int, source: torch.Generator | SampleNoise | None = None) -> Tensor:
        """(B, kmax): a uniform random permutation of each row's k slots, followed by its padding slots. `source`:
        a torch.Generator (training: torch.rand on its device) or a `SampleNoise` (sampling: the keys of row b are
        `uniform(ORDER_STREAM, 0, (kmax,))` of sample index[b], so the order does not depend on the batch; a stable
        sort breaks the rare tie by slot)."""
        B = k.shape[0]
        if isinstance(source, SampleNoise):
            keys = source.uniform(ORDER_STREAM, 0, (kmax,)).to(k.device)
        else:
            keys = torch.rand(B, kmax, generator=source, device=source.device if source is not None else "cpu")
            keys = keys.to(k.device)
        pad = torch.arange(kmax, device=k.device)[None] >= k[:, None]
        keys = torch.where(pad, 2.0 + torch.arange(kmax, device=k.device, dtype=keys.dtype)[None], keys)
        return keys.argsort(dim=1, stable=True) if isinstance(source, SampleNoise) else keys.argsort(1)

    def training_logits(self, batch: dict[str, Tensor], generator: torch.Generator | None = None):
        ids, k = batch["ids"], batch["k"]
        order = self.random_order(k, ids.shape[1], generator)
        return self.teacher_logits(ids, k, self.labels_for(batch["label"]), order)

    # ---------------------------------------------------------------- decoding
    @torch.no_grad()
    def decode(self, labels: Tensor, k: int, order: Tensor, pick: Pick, guided: bool = False,
               steps: int | None = None, dtype: torch.dtype | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Generate K merged ids per label (B,) in slot order `order` (B, K). `steps` None decodes one token per
        step; otherwise the cosine schedule decodes all K in `steps` forward passes. Returns ids (B, K) in slot
        order and statistics."""
        B, dev = labels.shape[0], labels.device
        side = math.isqrt(k)
        if side * side != k or side > self.grid:
            raise ValueError(f"RandAR decodes K = a square number of slots up to N={self.n_tokens}, got {k}")
        if order.shape != (B, k):
            raise ValueError(f"order must be ({B}, {k}), got {tuple(order.shape)}")
        counts = [1] * k if steps is None else randar_schedule(k, steps)
        lab = torch.cat([labels, torch.full_like(labels, self.gpt.null_class)]) if guided else labels
        o = torch.cat([order, order]) if guided else order
        R = lab.shape[0]
        rows, cols = o // side, o % side
        cos, sin = self.gpt.rope(rows, cols)  # (R, K, D/2)
        pis = self.pi_embeds(cos, sin)  # (R, K, C)
        kv = self.gpt.new_cache(R, 2 * k, dtype=dtype)
        out = torch.zeros(B, k, dtype=torch.long, device=dev)  # in decoding order
        one, zero = self.prefix_angles(1, dev)
        # step 0 input: [class, PI_0 .. PI_{m-1}]
        x = torch.cat([self.gpt.embed_class(lab)[:, None], pis[:, : counts[0]]], 1)
        c = torch.cat([one.expand(R, 1, -1), cos[:, : counts[0]]], 1)
        s = torch.cat([zero.expand(R, 1, -1), sin[:, : counts[0]]], 1)
        done, forwards, fed = 0, 0, 0
        for si, m in enumerate(counts):
            kv.begin(x.shape[1])
            h = self.gpt.trunk(x.to(kv.k.dtype), c, s, cache=kv)[:, -m:]  # outputs at this step's m PIs
            kv.end()
            forwards += 1
            fed += x.shape[1]
            for j in range(m):  # the step's m tokens share the guidance of `done` tokens decoded before it
                t = done + j
                out[:, t] = self.gpt.sample_ids(h[:, j], lambda i, lg, t=t, d=done: pick(t, i, lg, decoded=d))[:B]
            if si + 1 == len(counts):
                break
            # the cache keeps [.., PI_done]; the other m-1 PIs are re-encoded with their tokens in between
            kv.truncate(kv.used - (m - 1))
            nxt = counts[si + 1]
            new = done + m
            tok = out[:, done:new].repeat(2, 1) if guided else out[:, done:new]
            te = self.gpt.embed_ids(tok)  # (R, m, C)
            # [x_done, PI_done+1, x_done+1, ..., PI_new-1, x_new-1] then PI_new .. PI_new+nxt-1
            parts = [te[:, :1]]
            cp, sp = [cos[:, done:done + 1]], [sin[:, done:done + 1]]
            for j in range(1, m):
                parts += [pis[:, done + j: done + j + 1], te[:, j: j + 1]]
                cp += [cos[:, done + j: done + j + 1]] * 2
                sp += [sin[:, done + j: done + j + 1]] * 2
            parts.append(pis[:, new: new + nxt])
            cp.append(cos[:, new: new + nxt])
            sp.append(sin[:, new: new + nxt])
            x, c, s = torch.cat(parts, 1), torch.cat(cp, 1), torch.cat(sp, 1)
            done = new
        ids = torch.empty_like(out)
        ids.scatter_(1, order, out)  # back to slot order
        return ids, {"forward_passes": forwards, "tokens_fed": fed, "schedule": counts}

    @torch.no_grad()
    def sample(self, labels: Tensor, k: int, pick: Pick, guided: bool = False, *, steps: int | None = None,
               noise: SampleNoise | None = None, dtype: torch.dtype | None = None) -> Sampled:
        """K merged ids in a random slot order drawn from `noise` (None: seed 0, samples 0..B-1), decoded in `steps`
        parallel steps (None: the default count for K; `steps=k` is one token per step); `assign` is left to the
        tokenizer's source recovery model."""
        B = labels.shape[0]
        noise = noise if noise is not None else SampleNoise.arange(0, B, device=labels.device)
        order = self.random_order(torch.full((B,), k, device=labels.device), k, noise)
        steps = default_steps(k) if steps is None else steps
        ids, stats = self.decode(labels, k, order, pick, guided, steps, dtype)
        return Sampled(ids, torch.full((B,), k, dtype=torch.long, device=labels.device), None, stats)
