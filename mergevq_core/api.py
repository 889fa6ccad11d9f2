"""High-level functions the CLI calls. No printing; each returns plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig, config_to_dict, load_config


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


def model_info(recipe: str | Path, tokens: int | None = None, overrides: tuple[str, ...] | list[str] = ()) -> ModelInfo:
    """Parameters per part and MACs at K, counted on the meta device (no data, no memory)."""
    cfg = load_config(recipe, overrides)
    keep = cfg.merge.keep if tokens is None else cfg.check_keep(tokens)
    return _tokenizer_info(cfg, keep, str(recipe))


def _tokenizer_info(cfg: RunConfig, keep: int, recipe: str) -> ModelInfo:
    import torch

    from .eval.complexity import count_params, mac_counter
    from .models import build_tokenizer

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
