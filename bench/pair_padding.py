"""ShifCon on megatron: contrastive pair rows padded to the LM width vs their own width.

The megatron stage (`methods/shifcon/megatron.py`) sends the MCL pair rows through layers
1..b-1 in the same micro-batch tensor as the LM rows, so they are right-padded to the LM
sequence width. This bench times what that costs in those layers, on the same decoder stack,
interleaved every repetition (forward + backward, the pooled mean of the output as the loss):

  padded    one pass: LM rows and 2n pair rows together, all at the LM width
  separate  two passes: the LM rows at the LM width, the pair rows at their own width

Defaults are the recipes' shapes (recipes/shifcon_7b.yaml: data.max_length 512, micro-batch 4,
8 pairs of at most 128 tokens; shifcon_70b.yaml: micro-batch 1 via --lm-rows 1) on a decoder of
SmolLM2-135M's layer shape (hidden 576, 9 / 3 heads, FFN 1536), random weights (time depends on
the shapes only), `--depth` layers standing for layers 1..b-1.
"""

from __future__ import annotations

import torch

from bench import timing
from bench.common import bench_parser, parse_bench_args


def build_stack(depth: int, hidden: int, heads: int, kv_heads: int, ffn: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaModel(config).train()


def fwd_bwd(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """One backward over the passes (what one micro-batch's backward does)."""
    model.zero_grad(set_to_none=True)
    loss = sum(model(inputs_embeds=x).last_hidden_state.float().mean() for x in batches)
    loss.backward()


def main() -> None:
    parser = bench_parser(__doc__, reps=5)
    parser.add_argument("--lm-rows", type=int, default=4, help="LM rows per micro-batch")
    parser.add_argument("--lm-width", type=int, default=512, help="LM sequence width")
    parser.add_argument("--pairs", type=int, default=8, help="parallel pairs (2n rows)")
    parser.add_argument("--pair-width", type=int, default=128, help="pair sequence width")
    parser.add_argument("--depth", type=int, default=4, help="layers 1..b-1")
    parser.add_argument("--hidden", type=int, default=576)
    args, threads = parse_bench_args(parser)
    print(timing.header("pair rows: padded to the LM width vs their own width", threads))
    model = build_stack(args.depth, args.hidden, 9, 3, 1536)
    g = torch.Generator().manual_seed(0)
    rows = 2 * args.pairs

    def embeds(n: int, width: int) -> torch.Tensor:
        return torch.randn(n, width, args.hidden, generator=g)

    padded = [embeds(args.lm_rows + rows, args.lm_width)]
    separate = [embeds(args.lm_rows, args.lm_width), embeds(rows, args.pair_width)]
    t = timing.interleave(
        {"padded": lambda: fwd_bwd(model, padded), "separate": lambda: fwd_bwd(model, separate)},
        args.reps,
        args.warmup,
    )
    tokens = {
        "padded": (args.lm_rows + rows) * args.lm_width,
        "separate": args.lm_rows * args.lm_width + rows * args.pair_width,
    }
    print(
        f"shape: {args.lm_rows} LM rows x {args.lm_width} + {rows} pair rows "
        f"(pairs {args.pair_width} wide), {args.depth} layers, hidden {args.hidden}"
    )
    for name in ("padded", "separate"):
        print(f"{name:9s} {tokens[name]:6d} tokens  {timing.fmt_times(t[name])}")
    ratio = timing.ratios(t["separate"], t["padded"])
    print(f"separate / padded: {timing.fmt_ratio(ratio)}, best-of {timing.best_ratio(t['separate'], t['padded']):.3f}; tokens {tokens['separate'] / tokens['padded']:.3f}")  # fmt: skip
    warning = timing.spread_warning(ratio, "separate / padded")
    if warning:
        print(warning)
    print(
        f"SUMMARY pair_padding lm_rows={args.lm_rows} lm_width={args.lm_width} "
        f"pair_width={args.pair_width} separate/padded={timing.median_spread(ratio)[0]:.3f} "
        f"({t.load_note()})"
    )


if __name__ == "__main__":
    main()
