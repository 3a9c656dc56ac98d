"""Greedy generation throughput with the ShifCon shift on vs off (ShiftedLM on SmolLM2-135M).

Same model, prompts and KV-cache path; `ShiftedLM.generate_ids` decodes exactly
max_new_tokens (``min_new_tokens`` equal) so every variant produces the same token count. The
vectors are the real precomputed kind (means of H_l over one prompt per language; the speed
does not depend on their values), band [11, 14] as in the demo recipe. Variants, interleaved:
  on     the shift applied at f and b, to the prompt and every generated token
  off    the same ShiftedLM with no language given (hooks installed, they return at once)
  plain  the hooks removed: the bare transformers model, what a user without ShifCon runs
Target: tokens/s(on) / tokens/s(off) >= 0.97; on/plain is printed too (the stricter reading).
"""

from __future__ import annotations

import time

import torch

from bench import timing
from bench.common import bench_parser, parse_bench_args, real_model

PROMPTS = {
    "fr": "Explique pourquoi le ciel est bleu en deux phrases.",
    "de": "Erkläre in zwei Sätzen, warum der Himmel blau ist.",
    "es": "Explica en dos frases por qué el cielo es azul.",
    "zh": "用两句话解释为什么天空是蓝色的。",
}


def main() -> None:
    parser = bench_parser(__doc__, reps=7)
    parser.add_argument("--new-tokens", type=int, default=16)
    args, threads = parse_bench_args(parser)

    from data.formatting import Batch, chat_prompt_ids, left_pad
    from methods.shifcon.infer import ShiftedLM
    from methods.shifcon.math import LanguageStats
    from methods.shifcon.method import ShifConHooks, capture_hidden

    model, tok = real_model()
    languages = ["en", *PROMPTS]
    band, layers = (11, 14), list(range(11, 15))
    stats = LanguageStats.zeros(languages, layers, model.config.hidden_size, torch.device("cpu"))
    texts = ["Explain in two sentences why the sky is blue.", *PROMPTS.values()]
    capture = ShifConHooks(model, band, dominant=0)  # the hooks are what capture H_l
    with torch.no_grad():
        for i, text in enumerate(texts):
            ids = tok(text, return_tensors="pt")["input_ids"]
            mask = torch.ones_like(ids)
            batch = Batch(ids, mask, ids, torch.tensor([i]))
            for layer, h in capture_hidden(model, model, batch, layers).items():
                stats.update(layer, h, mask, torch.tensor([i]))
    capture.remove()
    lm = ShiftedLM(model, tok, {"languages": languages, "band": list(band)}, stats)
    prompts = [chat_prompt_ids(tok, p) for p in PROMPTS.values()]
    input_ids, mask = left_pad(prompts, tok.pad_token_id)
    langs = list(PROMPTS)
    n_new = args.new_tokens * len(langs)

    def run(on: bool) -> None:
        out = lm.generate_ids(
            input_ids,
            mask,
            langs if on else None,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
        )
        assert out.shape[1] - input_ids.shape[1] == args.new_tokens

    def run_plain() -> None:
        lm.hooks.remove()  # microseconds: the hooks are two closures per layer in the band
        try:
            run(False)
        finally:
            lm.hooks = ShifConHooks(model, band, dominant=0)
            lm.hooks.set_vectors(stats)

    with torch.no_grad():  # the shift is really on: the first step's logits differ
        lang_ids = lm.lang_ids(langs)
        plain_logits = model(input_ids=input_ids, attention_mask=mask).logits[:, -1]
        with lm.hooks.inference_languages(lang_ids):
            shifted_logits = model(input_ids=input_ids, attention_mask=mask).logits[:, -1]
    assert not torch.allclose(plain_logits, shifted_logits), "shift had no effect"

    print(timing.header("shifted_generation: SmolLM2-135M, fp32, greedy, KV cache", threads))
    print(f"# batch {len(langs)} prompts ({input_ids.shape[1]} tokens, left-padded), "
          f"{args.new_tokens} new tokens each, band {band}; {args.reps} reps after "
          f"{args.warmup} warm-up, interleaved")  # fmt: skip
    timings = timing.interleave(
        {"off": lambda: run(False), "on": lambda: run(True), "plain": run_plain},
        args.reps,
        warmup=args.warmup,
    )
    tps = {k: [n_new / t for t in v] for k, v in timings.times.items()}
    for k in ("plain", "off", "on"):
        med, lo, hi = timing.median_spread(tps[k])
        print(f"{k:5s}: {med:.1f} tok/s [{lo:.1f}-{hi:.1f}]; time {timing.fmt_times(timings[k])}")
    r = timing.ratios(tps["on"], tps["off"])
    rp = timing.ratios(tps["on"], tps["plain"])
    med, med_p = timing.median_spread(r)[0], timing.median_spread(rp)[0]
    best = timing.best_ratio(timings["off"], timings["on"])  # tokens/s ratio = inverse time ratio
    best_p = timing.best_ratio(timings["plain"], timings["on"])
    print(f"on / off tokens/s: {timing.fmt_ratio(r)}; on / plain: {timing.fmt_ratio(rp)}; best-of-"
          f"{args.reps}: on/off {best:.3f}, on/plain {best_p:.3f}")  # fmt: skip
    if w := timing.spread_warning(r, "on/off"):
        print(w)
    # The shift's own cost, timed directly (immune to the noise above): both boundary shifts on
    # a decode step's hidden state [B, 1, D], set against the measured time per decode step.
    from methods.shifcon.math import shift_backward, shift_toward

    h = torch.randn(len(langs), 1, model.config.hidden_size)
    vec = {layer: lm.hooks.vectors[layer] for layer in band}
    n_calls = 2000
    start = time.perf_counter()
    for _ in range(n_calls):
        shift_toward(h, lang_ids, vec[band[0]], 0)
        shift_backward(h, lang_ids, vec[band[1]], 0)
    per_step_shift = (time.perf_counter() - start) / n_calls
    per_token = timing.median_spread(timings["on"])[0] / args.new_tokens
    direct = 1 - per_step_shift / per_token
    print(f"shift ops per decode step (f and b): {per_step_shift * 1e6:.1f} us vs "
          f"{per_token * 1e3:.1f} ms per decode step -> direct estimate on/off {direct:.4f}")  # fmt: skip
    print(f"SUMMARY shifted_generation: tokens/s shift-on/off {med:.3f} [{min(r):.3f}-{max(r):.3f}] "
          f"(target >= 0.97) {'OK' if med >= 0.97 else 'UNDER'}; on/plain (no hooks) {med_p:.3f}; "
          f"best-of: on/off {best:.3f}, on/plain {best_p:.3f}; direct shift-op estimate {direct:.4f} "
          f"[{timings.load_note()}]")  # fmt: skip


if __name__ == "__main__":
    main()
