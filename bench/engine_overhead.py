"""Our training loop on DeepSpeed vs a bare DeepSpeed loop: same model, data, config.

  ours  DeepSpeedEngine.train_step(micro_batches, lr) with the SFT method's loss (lr set per
        step, metric packing, one all-reduce of the logged scalars, grad-norm read)
  bare  deepspeed.initialize on the same backbone and the same generated DeepSpeed config,
        then forward -> cross-entropy -> engine.backward -> engine.step, written directly
Both ZeRO-3, one process, CPU; interleaved on the same batch. Target: ours/bare <= 1.05.
"""

from __future__ import annotations

import argparse

from bench.common import open_bench_session, same_length_batch
from bench.timing import fmt_ratio, fmt_times, interleave, median_spread, ratios, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    threads = set_threads()

    import deepspeed
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from launcher.loop import micro_batches
    from model.backbone import resolve_backbone

    session = open_bench_session({"method": "sft"})
    engine = session.engine
    micro = micro_batches(session, same_length_batch(session, 4))
    batch = micro[0]

    config = dict(engine.config)
    keep = HfDeepSpeedConfig(config)  # noqa: F841  (zero.Init while it lives)
    path = resolve_backbone(session.recipe.model).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    bare, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters()], config=config
    )

    def step_bare() -> None:
        bare.train()
        logits = bare(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        labels = batch.labels[:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
            reduction="sum",
        ) / batch.token_normalizer  # fmt: skip
        bare.backward(loss)
        bare.step()

    def step_ours() -> None:
        engine.train_step(micro, 1e-6)

    times = interleave({"bare": step_bare, "ours": step_ours}, args.reps, args.warmup)
    r = ratios(times["ours"], times["bare"])
    print(f"# SmolLM2-135M, DeepSpeed ZeRO-3, 1 process, CPU {threads} threads, fp32; batch "
          f"{tuple(batch.input_ids.shape)}; {args.reps} reps after {args.warmup} warm-up")  # fmt: skip
    for name, values in times.items():
        print(f"{name:5s} step: {fmt_times(values)}")
    med = median_spread(r)[0]
    print(f"ours / bare: {fmt_ratio(r)}")
    print(f"SUMMARY engine_overhead: ours/bare {med:.3f} [{min(r):.3f}-{max(r):.3f}] "
          f"(target <= 1.05) {'OK' if med <= 1.05 else 'OVER'}")  # fmt: skip


if __name__ == "__main__":
    main()
