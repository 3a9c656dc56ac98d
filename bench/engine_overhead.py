"""Our training loop on DeepSpeed vs a bare DeepSpeed loop: same model, data, config.

  ours  DeepSpeedEngine.train_step(micro_batches, lr) with the SFT method's loss (lr set per
        step, metric packing, one all-reduce of the logged scalars, grad-norm read)
  bare  deepspeed.initialize on the same backbone (same dtype, attention, checkpointing
        setting) and the same generated DeepSpeed config, then forward -> cross-entropy ->
        engine.backward -> engine.step, written directly
Both ZeRO-3, one process, CPU; interleaved on the same batch, and checked to compute the same
loss on it. Target: ours/bare <= 1.05.
"""

from __future__ import annotations

from bench import timing
from bench.common import bench_parser, open_bench_session, parse_bench_args, same_length_batch


def main() -> None:
    parser = bench_parser(__doc__, reps=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    args, threads = parse_bench_args(parser)

    import deepspeed
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    from launcher.loop import micro_batches
    from methods.base import lm_loss
    from model.backbone import load_causal_lm, resolve_backbone

    session = open_bench_session(
        {
            "method": "sft",
            "data": {"max_length": args.max_length},
            "training": {"steps": 1, "global_batch_size": args.batch,
                         "micro_batch_size": args.batch, "eval_batch_size": args.batch},
        }
    )  # fmt: skip
    engine = session.engine
    micro = micro_batches(session, same_length_batch(session, args.batch))
    batch = micro[0]

    config = dict(engine.config)
    keep = HfDeepSpeedConfig(config)  # noqa: F841  (zero.Init while it lives)
    section = session.recipe.model
    model = load_causal_lm(resolve_backbone(section), section, torch.float32)
    bare, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=list(model.parameters()), config=config
    )

    def bare_loss() -> torch.Tensor:
        logits = bare(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits = logits[:, :-1].flatten(0, 1).float()
        labels = batch.labels[:, 1:].flatten()
        loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100,
                                                 reduction="sum")  # fmt: skip
        return loss / batch.token_normalizer

    with torch.no_grad():  # same weights, same batch: the two losses must agree
        bare.eval(), engine.ds.eval()
        ours_l = lm_loss(engine.ds(input_ids=batch.input_ids,
                                   attention_mask=batch.attention_mask).logits, batch)  # fmt: skip
        bare_l = bare_loss()
    assert torch.allclose(ours_l, bare_l, rtol=1e-4), (ours_l.item(), bare_l.item())

    def step_bare() -> None:
        bare.train()
        bare.backward(bare_loss())
        bare.step()

    def step_ours() -> None:
        engine.train_step(micro, 1e-6)

    print(
        timing.header("engine_overhead: SmolLM2-135M, DeepSpeed ZeRO-3, 1 process, fp32", threads)
    )
    print(f"# batch {tuple(batch.input_ids.shape)}; same loss checked ({ours_l.item():.4f}); "
          f"{args.reps} reps after {args.warmup} warm-up, interleaved")  # fmt: skip
    timings = timing.interleave({"bare": step_bare, "ours": step_ours}, args.reps, args.warmup)
    r = timing.ratios(timings["ours"], timings["bare"])
    for name, values in timings.times.items():
        print(f"{name:5s} step: {timing.fmt_times(values)}")
    med = timing.median_spread(r)[0]
    best = timing.best_ratio(timings["ours"], timings["bare"])
    print(f"ours / bare: {timing.fmt_ratio(r)}; best-of-{args.reps} ratio {best:.3f}")
    if w := timing.spread_warning(r, "ours/bare"):
        print(w)
    print(f"SUMMARY engine_overhead: ours/bare {med:.3f} [{min(r):.3f}-{max(r):.3f}] "
          f"(target <= 1.05) {'OK' if med <= 1.05 else 'OVER'}; best-of ratio {best:.3f} "
          f"[{timings.load_note()}]")  # fmt: skip


if __name__ == "__main__":
    main()
