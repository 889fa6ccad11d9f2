"""`mergevq info`: parameters, MACs and the merge schedule of a recipe, without data."""

from __future__ import annotations

from .. import console
from ..options import JsonOpt, RecipeArg, SetOpt, TokensOpt

EXAMPLES = """
Examples:

  mergevq info recipes/gr.yaml

  mergevq info recipes/g.yaml --tokens 144 --json

  mergevq info recipes/tiny.yaml --set model.decoder.depth=4

  mergevq info recipes/ar/mergear-l.yaml            # a generator recipe: parameters, KV bytes per token
"""


def info(recipe: RecipeArg, tokens: TokensOpt = None, set_: SetOpt = None, json_: JsonOpt = False) -> None:
    """Parameters per module, encoder/decoder GMACs at K, the merge schedule and the codebook size; for a
    generator recipe (kind: ar) its parameters, vocabulary layout and KV-cache bytes per token."""
    from mergevq_core import api

    res = api.model_info(recipe, tokens=tokens, overrides=tuple(set_ or ()))
    if json_:
        console.print_json(res.to_json())
        return
    if res.to_json().get("kind") == "ar":
        _ar_info(res)
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


def _ar_info(res) -> None:
    g, t, p = res.gpt, res.tokens, res.params
    head = f"factorised {' + '.join(map(str, t['sub_bits']))} bits" if t["sub_bits"] else "plain"
    if g["factor_depth"]:
        head += f", {g['factor_depth']} intra-position blocks"
    extra = {"mergear": f"window w = {t.get('window')}, representatives by {t.get('mask_groups')}",
             "randar": "position-instruction tokens on the √K×√K slot grid", "llamagen": "raster order, causal"}
    console.kv(f"{res.generator}  ({res.recipe})", [
        ("backbone", f"{g['depth']} layers, {g['dim']}-d, {g['heads']} heads, SwiGLU hidden {g['hidden']}"),
        ("tokens", f"N {t['N']} ({t['grid']}×{t['grid']}), vocabulary {t['vocab_size']:,} ({head}), {t['num_classes']} classes"),
        ("layout", extra[res.generator]),
        ("KV cache", f"{res.kv_bytes_per_token / 1024:.0f} KiB per token (bf16, all layers)"),
        ("compute", (f"{res.gflops_per_token:.2f} GFLOPs" if res.gflops_per_token >= 0.1 else f"{res.gflops_per_token * 1e3:.2f} MFLOPs")
                    + " per decoded token (matmuls, no attention)"),
    ])
    rows = [[name.replace("_", " "), f"{v / 1e6:.2f}"] for name, v in p.items()]
    console.table("", ["part", "params (M)"], rows)
