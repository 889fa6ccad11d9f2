"""The tokenizer's contracts on every recipe, at reduced size."""

from __future__ import annotations

import pytest
import torch

from mergevq_core.models import build_tokenizer
from mergevq_core.tome import source_matrix

from .conftest import ROOT, TOKENIZER_RECIPES, small_config


@pytest.fixture(params=TOKENIZER_RECIPES, ids=lambda p: p.stem)
def tokenizer(request):
    return build_tokenizer(small_config(request.param)).eval()


def _images(tok, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = tok.cfg.model.image_size
    return torch.rand(b, 3, s, s, generator=g) * 2 - 1


def test_encode_decode_shapes(tokenizer):
    x = _images(tokenizer)
    n, d = tokenizer.n_tokens, tokenizer.cfg.quant.dim
    lo = next(k * k for k in range(1, n) if k * k >= tokenizer.cfg.min_keep)
    for k in sorted({lo, tokenizer.cfg.merge.keep, n}):
        enc = tokenizer.encode(x, tokens=k)
        assert enc.ids.shape == (2, k) and enc.ids.dtype == torch.int64
        assert enc.assign.shape == (2, n)
        assert enc.quantized.shape == (2, k, d)
        assert int(enc.ids.min()) >= 0 and int(enc.ids.max()) < 2**d
        assert enc.size.sum(dim=1).tolist() == [float(n)] * 2  # token sizes add up to N
        out = tokenizer.decode(enc.ids, enc.assign)
        assert out.shape == x.shape


def test_assign_covers_every_slot_in_canonical_order(tokenizer):
    enc = tokenizer.encode(_images(tokenizer, b=3))
    k = enc.ids.shape[1]
    for a in enc.assign:
        assert sorted(set(a.tolist())) == list(range(k))  # every slot holds at least one original token
        firsts = [a.tolist().index(j) for j in range(k)]
        assert firsts == sorted(firsts)  # slots are ordered by the first raster position they cover
    s = source_matrix(enc.assign, k)
    assert torch.equal(s.sum(1), torch.ones_like(s.sum(1)))  # each original token in exactly one slot
    assert torch.allclose(s.sum(2), enc.size)  # slot sizes equal what the source matrix says


def test_identical_inputs_and_seeds_give_identical_ids(tokenizer):
    x = _images(tokenizer)
    a, b = tokenizer.encode(x), tokenizer.encode(x.clone())
    assert torch.equal(a.ids, b.ids) and torch.equal(a.assign, b.assign)
    torch.manual_seed(123)
    other = build_tokenizer(tokenizer.cfg).eval()
    torch.manual_seed(123)
    again = build_tokenizer(tokenizer.cfg).eval()
    assert torch.equal(other.encode(x).ids, again.encode(x).ids)


def test_decode_from_ids_matches_straight_through_codes(tokenizer):
    x = _images(tokenizer)
    with torch.no_grad():
        recon, enc = tokenizer(x)
        assert torch.allclose(recon, tokenizer.decode(enc.ids, enc.assign), atol=1e-5)


def test_gradients_reach_encoder_through_quantizer(tokenizer):
    tokenizer.train()
    recon, enc = tokenizer(_images(tokenizer), compute_entropy=True)
    loss = recon.square().mean() + enc.quant.commit_loss + enc.quant.entropy_loss
    loss.backward()
    assert tokenizer.encoder.stem.conv_in.weight.grad is not None
    assert tokenizer.encoder.stem.conv_in.weight.grad.abs().sum() > 0


def test_source_recovery_predicts_valid_assign(tokenizer):
    enc = tokenizer.encode(_images(tokenizer))
    logits = tokenizer.recovery_logits(enc.quantized)
    k = enc.ids.shape[1]
    assert logits.shape == (2, tokenizer.n_tokens, k)
    loss = tokenizer.recovery.loss(logits, enc.assign)
    assert torch.isfinite(loss)
    pred = tokenizer.predict_assign(enc.ids)
    assert pred.shape == enc.assign.shape and int(pred.min()) >= 0 and int(pred.max()) < k
    assert tokenizer.decode(enc.ids, pred).shape[-1] == tokenizer.cfg.model.image_size


def test_align_features(tokenizer):
    s = tokenizer.cfg.model.image_size
    feats = tokenizer.align_features(torch.rand(2, 3, s, s))
    assert feats.shape == (2, tokenizer.cfg.model.align_head.out_dim)


def test_fresh_dino_alignment_gives_a_moderate_gradient(tokenizer):
    """The EMA (DINO-style) teacher starts as a copy of the student: the loss must still teach (non-zero
    gradient) without exploding, or global clipping would silence every other loss."""
    import copy

    from mergevq_core.losses import DinoCE

    s = tokenizer.cfg.model.image_size
    teacher = copy.deepcopy(tokenizer).eval()
    ce = DinoCE(tokenizer.cfg.model.align_head.out_dim)
    with torch.no_grad():
        target = teacher.align_features(torch.rand(4, 3, s, s) * 2 - 1)
    tokenizer.zero_grad()
    ce(tokenizer.align_features(torch.rand(4, 3, s, s) * 2 - 1), target).backward()
    norm = torch.cat([p.grad.flatten() for p in tokenizer.align_head.parameters()]).norm()
    assert 1e-4 < float(norm) < 1e3


def test_sincos_position_embedding_tells_interior_tokens_apart():
    """A flat image: without a position embedding the encoder's interior tokens are identical (only the conv
    padding marks the border); with `pos_embed: sincos` every token differs, so codes can say where they lie.
    Under zero conv biases (`all-trunc-normal`), so the border's zero padding is not carried inwards by a bias."""
    from mergevq_core.models.encoder import sincos_grid_embedding

    emb = sincos_grid_embedding(4, 6, 32)
    assert emb.shape == (24, 32) and torch.unique(emb, dim=0).shape[0] == 24
    x = torch.zeros(1, 3, 32, 32)
    interior = []
    for pe in ("none", "sincos"):
        extra = (f"model.encoder.pos_embed={pe}", "model.init_scheme=all-trunc-normal")
        tok = build_tokenizer(small_config(ROOT / "recipes" / "tiny.yaml", extra)).eval()
        n = tok.n_tokens
        with torch.no_grad():
            out = tok.encoder(x, [0] * len(tok.encoder.blocks))  # K = N: no merging
        side = int(n ** 0.5)
        grid = out.tokens[0].reshape(side, side, -1)[2:-2, 2:-2].reshape(-1, out.tokens.shape[-1])
        interior.append(torch.cdist(grid, grid).max())
    assert float(interior[0]) < 1e-4 < float(interior[1])
