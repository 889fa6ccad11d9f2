"""Parameter and multiply-accumulate counts without real data.

Convention (paper Table A1, fvcore, SPEC §1): MACs of convolutions and linear layers only; attention's QKᵀ and
AV products, norms and activations are not counted. Forward hooks read output shapes, so the model runs on the
meta device: no memory, no arithmetic, any size.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["ARInfo", "ModelInfo", "count_params", "generator_info", "mac_counter", "tokenizer_info"]


def count_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _layer_macs(module: nn.Module, out: Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


@contextmanager
def mac_counter(root: nn.Module) -> Iterator[Callable[[], int]]:
    """Counts conv/linear MACs of every forward call under `root` while the context is open."""
    total = [0]
    handles = [
        m.register_forward_hook(lambda mod, _inp, out: total.__setitem__(0, total[0] + _layer_macs(mod, out)))
        for m in root.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        yield lambda: total[0]
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- `mergevq info`


@dataclass
class ModelInfo:
    recipe: str
    variant: str
    params: dict[str, int]  # encoder (stem + ToMe ViT + code projection), decoder, source_recovery, align_head, total
    gmacs: dict[str, float]  # conv + linear multiply-accumulates per image at K (encoder, source_recovery) and N (decoder)
    gmacs_full: dict[str, float]  # the same with no merging (K = N)
    tokens: dict[str, int]  # N, K, grid
    schedule: list[int]  # merges per encoder block, Σ = N - K
    codebook_size: int
    code_bits: int
    image_size: int
    config: dict[str, Any] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "variant": self.variant, "params": self.params, "gmacs": self.gmacs,
            "gmacs_full": self.gmacs_full, "tokens": self.tokens, "schedule": self.schedule,
            "codebook_size": self.codebook_size, "code_bits": self.code_bits, "image_size": self.image_size,
        }


def tokenizer_info(cfg: Any, keep: int, recipe: str) -> ModelInfo:
    """Parameters per part and MACs at K of a tokenizer config (`config.RunConfig`), counted on the meta device."""
    from ..config import config_to_dict
    from ..models import build_tokenizer

    with torch.device("meta"):
        tok = build_tokenizer(cfg)
        x = torch.empty(1, 3, cfg.model.image_size, cfg.model.image_size)

        def encoder_macs(k: int) -> tuple[float, float, Any]:
            with mac_counter(tok.encoder) as a, mac_counter(tok.code_proj) as b:
                enc = tok.encode(x, tokens=k)
            rec = 0.0
            if tok.recovery is not None:
                with mac_counter(tok.recovery) as r:
                    tok.recovery_logits(enc.quantized)
                rec = r() / 1e9
            return (a() + b()) / 1e9, rec, enc

        enc_k, rec_k, enc = encoder_macs(keep)
        enc_n, rec_n, _ = encoder_macs(cfg.model.n_tokens)
        with mac_counter(tok.decoder) as d:
            tok.decode_codes(enc.quantized, enc.assign)
        dec = d() / 1e9

    params = {name: count_params(m) for name, m in tok.param_groups().items()}
    params["total"] = count_params(tok)
    return ModelInfo(
        recipe=recipe,
        variant=cfg.model.name,
        params=params,
        gmacs={"encoder": enc_k, "decoder": dec, "source_recovery": rec_k},
        gmacs_full={"encoder": enc_n, "decoder": dec, "source_recovery": rec_n},
        tokens={"N": cfg.model.n_tokens, "K": keep, "grid": cfg.model.grid},
        schedule=list(tok.schedule(keep)),
        codebook_size=cfg.quant.codebook_size,
        code_bits=cfg.quant.dim,
        image_size=cfg.model.image_size,
        config=config_to_dict(cfg),
    )


@dataclass
class ARInfo:
    recipe: str
    generator: str
    params: dict[str, int]  # trunk (blocks + final norm), embeddings (class + tokens), heads (incl. intra-position
    #                         blocks of a factorised head), generator extras (M table / PI vector), total
    gpt: dict[str, Any]
    tokens: dict[str, Any]  # N, grid, vocabulary, sub-token bits, sequence length
    kv_bytes_per_token: int  # bf16 keys + values over all layers
    gflops_per_token: float  # 2 × matmul parameters read per decoded token (trunk + head), no attention
    config: dict[str, Any] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "kind": "ar", "generator": self.generator, "params": self.params, "gpt": self.gpt,
                "tokens": self.tokens, "kv_bytes_per_token": self.kv_bytes_per_token,
                "gflops_per_token": self.gflops_per_token}


def generator_info(cfg: Any, recipe: str) -> ARInfo:
    """Parameter counts of a generator recipe on the meta device; vocab/N/classes must be in the recipe."""
    from ..config import config_to_dict
    from ..generators import build_generator
    from ..models.gpt import gpt_config_from_recipe

    gcfg = gpt_config_from_recipe(cfg.model)
    with torch.device("meta"):
        gen = build_generator(cfg.generator.name, gcfg, **cfg.generator_options())
    g = gen.gpt
    params = {
        "trunk": count_params(g.blocks) + count_params(g.norm),
        "embeddings": count_params(g.cls_embed) + count_params(g.tok_embed),
        "heads": count_params(g.heads) + count_params(g.factor_blocks) + (count_params(g.factor_norm) if g.factor_norm is not None else 0),
        "generator_extra": sum(p.numel() for n, p in gen.named_parameters() if not n.startswith("gpt.")),
    }
    params["total"] = count_params(gen)
    matmul = params["trunk"] + params["heads"]
    return ARInfo(
        recipe=recipe, generator=cfg.generator.name, params=params, gpt={**asdict(gcfg), "hidden": gcfg.hidden},
        tokens={"N": gcfg.max_len, "grid": gen.grid, "vocab_size": gcfg.vocab_size, "sub_bits": list(gcfg.factorized),
                "num_classes": gcfg.num_classes, "train_sequence": gen.train_sequence_len, **gen.options()},
        kv_bytes_per_token=gcfg.kv_bytes_per_token(2), gflops_per_token=2 * matmul / 1e9, config=config_to_dict(cfg),
    )
