"""Greedy generation throughput with the ShifCon shift on vs off (ShiftedLM on SmolLM2-135M).

Same model, prompts and KV-cache path; `ShiftedLM.generate_ids` decodes exactly
max_new_tokens (min_new_tokens equal) so both variants produce the same token count. The
vectors are the real precomputed kind (means of H_l over a few prompts per language), band
[11, 14] as in the demo recipe. Target: tokens/s(on) / tokens/s(off) >= 0.97.
"""

from __future__ import annotations

import argparse

import torch

from bench.timing import fmt_ratio, fmt_times, interleave, median_spread, ratios, set_threads

PROMPTS = {
    "fr": "Explique pourquoi le ciel est bleu en deux phrases.",
    "de": "Erkläre in zwei Sätzen, warum der Himmel blau ist.",
    "es": "Explica en dos frases por qué el cielo es azul.",
    "zh": "用两句话解释为什么天空是蓝色的。",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    threads = set_threads()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.formatting import Batch
    from launcher.schema import ModelSection
    from model.backbone import resolve_backbone
    from model.shifcon import capture_hidden
    from model.shifcon_infer import ShiftedLM
    from model.shifcon_math import LanguageStats

    path = resolve_backbone(ModelSection()).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    languages = ["en", *PROMPTS]
    band, layers = (11, 14), list(range(11, 15))
    stats = LanguageStats.zeros(languages, layers, model.config.hidden_size, torch.device("cpu"))
    texts = ["Explain in two sentences why the sky is blue.", *PROMPTS.values()]
    with torch.no_grad():
        for i, text in enumerate(texts):
            ids = tok(text, return_tensors="pt")["input_ids"]
            mask = torch.ones_like(ids)
            batch = Batch(ids, mask, ids, torch.tensor([i]))
            for layer, h in capture_hidden(model, model, batch, layers).items():
                stats.update(layer, h, mask, torch.tensor([i]))
    lm = ShiftedLM(model, tok, {"languages": languages, "band": list(band)}, stats)
    input_ids, mask = lm._prompt_batch(list(PROMPTS.values()), None, left=True)
    langs = list(PROMPTS)
    n_new = args.new_tokens * len(langs)

    def run(on: bool) -> None:
        out = lm.generate_ids(
            input_ids, mask, langs if on else None, max_new_tokens=args.new_tokens
        )
        assert out.shape[1] - input_ids.shape[1] == args.new_tokens

    times = interleave({"off": lambda: run(False), "on": lambda: run(True)}, args.reps, warmup=1)
    tps = {k: [n_new / t for t in v] for k, v in times.items()}
    r = ratios(tps["on"], tps["off"])
    print(f"# SmolLM2-135M, CPU {threads} threads, fp32, greedy, batch {len(langs)} prompts "
          f"({input_ids.shape[1]} tokens, left-padded), {args.new_tokens} new tokens each, band "
          f"{band}; {args.reps} reps after 1 warm-up, interleaved")  # fmt: skip
    for k in ("off", "on"):
        med, lo, hi = median_spread(tps[k])
        print(f"shift {k:3s}: {med:.1f} tok/s [{lo:.1f}-{hi:.1f}]; time {fmt_times(times[k])}")
    med = median_spread(r)[0]
    print(f"on / off tokens/s: {fmt_ratio(r)}")
    print(f"SUMMARY shifted_generation: tokens/s shift-on/off {med:.3f} [{min(r):.3f}-{max(r):.3f}] "
          f"(target >= 0.97) {'OK' if med >= 0.97 else 'UNDER'}")  # fmt: skip


if __name__ == "__main__":
    main()
