"""Weight selection from a DINOv2-layout state dict into a narrower encoder."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mergevq_core.errors import CheckpointError, ConfigError
from mergevq_core.models import build_tokenizer
from mergevq_core.models.dinov2_init import init_from_dinov2, select_weights

from .conftest import ROOT, small_config


def test_select_weights_uniform_and_qkv():
    t = torch.arange(12.0)
    assert select_weights(t, (6,)).tolist() == [0, 2, 4, 6, 8, 10]
    assert select_weights(t, (5,)).tolist() == [0, 3, 6, 8, 11]  # round(linspace(0, 11, 5))
    qkv = torch.arange(12.0)  # rows [q0..q3, k0..k3, v0..v3]
    assert select_weights(qkv, (6,), qkv=True).tolist() == [0, 2, 4, 6, 8, 10]
    w = torch.arange(24.0).reshape(6, 4)
    assert select_weights(w, (3, 2)).tolist() == [[0, 2], [8, 10], [16, 18]]


@pytest.fixture
def teacher_file(tmp_path):
    """A small timm ViT with DINOv2's key layout (blocks.*, cls_token, ls1/ls2), saved as safetensors."""
    import timm

    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, embed_dim=128, depth=4, num_heads=4, init_values=1e-5)
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    path = tmp_path / "dinov2.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_init_from_dinov2_copies_selected_weights(teacher_file):
    path, sd = teacher_file
    tok = build_tokenizer(small_config(ROOT / "recipes" / "gr.yaml"))  # encoder width 64, 3 blocks
    keys = init_from_dinov2(tok.encoder, path)
    assert "cls_token" in keys and "blocks.2.mlp.fc2.weight" in keys
    enc = tok.encoder.state_dict()
    assert torch.equal(enc["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.fc1.weight"][::2, ::2])
    assert torch.equal(enc["blocks.1.attn.qkv.weight"][64:128], sd["blocks.1.attn.qkv.weight"][128:256:2, ::2])  # k rows
    assert torch.equal(enc["cls_token"], sd["cls_token"][..., ::2])


def test_missing_and_foreign_weights(tmp_path, teacher_file):
    tok = build_tokenizer(small_config(ROOT / "recipes" / "gr.yaml"))
    with pytest.raises(ConfigError, match="model.encoder.dinov2_weights"):
        init_from_dinov2(tok.encoder, tmp_path / "absent.safetensors")
    save_file({"head.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="lacks"):
        init_from_dinov2(tok.encoder, tmp_path / "other.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        init_from_dinov2(tok.encoder, tmp_path / "junk.pth")
