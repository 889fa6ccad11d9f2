"""`mergevq info`: parameters, MACs and the merge schedule of a recipe, without data."""

from __future__ import annotations

from .. import console
from ..options import JsonOpt, RecipeArg, SetOpt, TokensOpt

EXAMPLES = """
Examples:

  mergevq info recipes/gr.yaml

  mergevq info recipes/g.yaml --tokens 144 --json

  mergevq info recipes/tiny.yaml --set model.decoder.depth=4
"""


def info(recipe: RecipeArg, tokens: TokensOpt = None, set_: SetOpt = None, json_: JsonOpt = False) -> None:
    """Parameters per module, encoder/decoder GMACs at K, the merge schedule and the codebook size."""
    from mergevq_core import api

    res = api.model_info(recipe, tokens, tuple(set_ or ()))
    if json_:
        console.print_json(res.to_json())
        return
    p, g, gf, t = res.params, res.gmacs, res.gmacs_full, res.tokens
    console.kv(
        f"{res.variant}  ({res.recipe})",
        [
            ("image", f"{res.image_size}px → {t['grid']}×{t['grid']} = N {t['N']} tokens, keep K {t['K']}"),
            ("codebook", f"2^{res.code_bits} = {res.codebook_size:,} (LFQ)"),
            ("schedule", f"{res.schedule}  (Σ {sum(res.schedule)} = N − K)"),
        ],
    )
    rows = [
        ["encoder", f"{p['encoder'] / 1e6:.2f}", f"{g['encoder']:.2f}", f"{gf['encoder']:.2f}"],
        ["decoder", f"{p['decoder'] / 1e6:.2f}", f"{g['decoder']:.2f}", f"{gf['decoder']:.2f}"],
        ["source recovery", f"{p['source_recovery'] / 1e6:.2f}", f"{g['source_recovery']:.2f}", f"{gf['source_recovery']:.2f}"],
        ["align head", f"{p['align_head'] / 1e6:.2f}", "-", "-"],
        ["total", f"{p['total'] / 1e6:.2f}", "", ""],
    ]
    console.table("", ["module", "params (M)", f"GMACs @K={t['K']}", f"GMACs @N={t['N']}"], rows)
