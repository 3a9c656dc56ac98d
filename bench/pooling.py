"""Which pooling makes sentence embeddings and language means usable? Measured, not assumed.

    python -m bench.pooling [--data-dir ../shared/data] [--questions 48] [--layers 12,13,14,15]

On the frozen backbone and the shared parallel GSM8K questions (the same questions in en and
every target language), for each input format (raw text / chat template) and pooling (all
tokens / without the first position / the user-content span) and post-processing (normalise
only, as the original MCL; centred per language over the batch), it prints: mean cosine of
translations and of unrelated sentences, the 8-way InfoNCE at initialisation for several
temperatures (ln 8 = 2.079 is chance), X->en bitext retrieval among all questions, and
nearest-centroid language identification on held-out questions (raw, unnormalised means:
what `detect` compares against the shift vectors).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F

TAUS = (0.05, 0.1, 0.2, 0.5, 1.0)


def _load_questions(data_dir: Path, langs: list[str], n: int) -> list[dict[str, str]]:
    """Questions translated into every language, keyed by the English text (rows differ in order)."""
    by_lang = {}
    for lang in langs:
        path = data_dir / "parallel" / "gsm8k_questions" / f"{lang}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        by_lang[lang] = {r["en"]: r["target"] for r in rows}
    common = sorted(set.intersection(*(set(d) for d in by_lang.values())))
    random.Random(0).shuffle(common)
    return [{"en": en, **{lang: by_lang[lang][en] for lang in langs}} for en in common[:n]]


def _norms_report(h: torch.Tensor, mask: torch.Tensor) -> str:
    norms = h.norm(dim=-1)[mask.bool()]
    first = h[:, 0].norm(dim=-1)
    rest = h[:, 1:].norm(dim=-1)[mask[:, 1:].bool()]
    return (
        f"first-position norm median {first.median():.0f}; other positions median "
        f"{rest.median():.0f}, p99 {rest.quantile(0.99):.0f}, max {rest.max():.0f}; "
        f"all median {norms.median():.0f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pooling", description=__doc__)
    parser.add_argument("--data-dir", default=os.environ.get("POLYSHIFT_SHARED_DATA"))
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--layers", default="12,13,14,15")
    parser.add_argument("--languages", default="de,es,fr,ja,ru,sw,zh")
    parser.add_argument("--batches", type=int, default=60, help="random 8-pair batches for InfoNCE")
    parser.add_argument("--formats", default="raw,chat")
    parser.add_argument("--posts", default="normalise,centred,stored")
    args = parser.parse_args(argv)
    from config.schema import ModelSection
    from data.formatting import chat_prompt_ids, content_span
    from model.backbone import load_causal_lm, load_tokenizer, resolve_backbone
    from model.layers import capture_layers, truncated

    data_dir = Path(args.data_dir or Path(__file__).resolve().parents[2] / "shared" / "data")
    layers = [int(x) for x in args.layers.split(",")]
    langs = args.languages.split(",")
    section = ModelSection()
    backbone = resolve_backbone(section)
    tok = load_tokenizer(backbone, section)
    model = load_causal_lm(backbone, section, torch.float32).eval()
    qs = _load_questions(data_dir, ["en", *langs][1:], args.questions)
    all_langs = ["en", *langs]
    texts = [
        (lang, i, q["en"] if lang == "en" else q[lang])
        for lang in all_langs
        for i, q in enumerate(qs)
    ]

    torch.manual_seed(0)
    results = {}
    for fmt in args.formats.split(","):
        pooled: dict[str, dict[int, list]] = {}
        pools = ("all", "skip_first") + (("user_span",) if fmt == "chat" else ())
        for p in pools:
            pooled[p] = {layer: [] for layer in layers}
        tokens: dict[str, dict[int, list]] = {p: {layer: [] for layer in layers} for p in pools}
        report = None
        for start in range(0, len(texts), 16):
            chunk = texts[start : start + 16]
            if fmt == "raw":
                ids = [tok(t)["input_ids"] for _, _, t in chunk]
                spans = [(1, len(x)) for x in ids]
            else:
                ids = [chat_prompt_ids(tok, t) for _, _, t in chunk]
                spans = [content_span(tok, t) for _, _, t in chunk]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), tok.pad_token_id)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for r, x in enumerate(ids):
                input_ids[r, : len(x)] = torch.tensor(x)
                mask[r, : len(x)] = 1
            with (
                torch.no_grad(),
                truncated(model, max(layers)),
                capture_layers(model, layers) as cap,
            ):
                model(input_ids=input_ids, attention_mask=mask, logits_to_keep=1)
                cap = dict(cap)
            if report is None:
                report = _norms_report(cap[layers[0]], mask)
            pos = torch.arange(width).unsqueeze(0)
            masks = {"all": mask, "skip_first": mask * (pos >= 1)}
            if "user_span" in pools:
                s = torch.tensor([a for a, _ in spans]).unsqueeze(1)
                e = torch.tensor([b for _, b in spans]).unsqueeze(1)
                masks["user_span"] = mask * (pos >= s) * (pos < e)
            for p in pools:
                m = masks[p].double()
                for layer in layers:
                    h = cap[layer].double()
                    summed = torch.einsum("btd,bt->bd", h, m)
                    pooled[p][layer].append(summed / m.sum(1, keepdim=True))
                    tokens[p][layer].append((summed, m.sum(1)))
        print(f"[{fmt}] layer {layers[0]}: {report}", flush=True)
        n = len(qs)
        for p in pools:
            for post in args.posts.split(","):
                row = _score(pooled[p], tokens[p], layers, all_langs, n, post, args.batches)
                results[(fmt, p, post)] = row
                tau_txt = " ".join(f"{t}:{row['nce'][t]:.3f}" for t in TAUS)
                print(
                    f"{fmt:4s} {p:10s} {post:9s} cos+ {row['pos']:.3f} cos- {row['neg']:.3f} "
                    f"| InfoNCE tau {tau_txt} | bitext {row['bitext']:.3f} | "
                    f"lang-id {row['langid']:.3f} (worst {row['langid_worst']})",
                    flush=True,
                )
    print(f"chance InfoNCE ln 8 = {math.log(8):.3f}")
    return 0


def _score(pooled, tokens, layers, all_langs, n, post, n_batches) -> dict:
    """Average over band layers of the measurements described in the module docstring."""
    k = len(all_langs)
    pos_c, neg_c, bit, lid, worst = [], [], [], [], {}
    nce = {t: [] for t in TAUS}
    rng = random.Random(1)
    for layer in layers:
        u = torch.cat(pooled[layer]).view(k, n, -1)  # [lang, question, D] raw means
        s = F.normalize(u, dim=-1)
        tok_sum = torch.cat([x for x, _ in tokens[layer]]).view(k, n, -1)
        tok_cnt = torch.cat([c for _, c in tokens[layer]]).view(k, n)
        stored = tok_sum.sum(1) / tok_cnt.sum(1, keepdim=True)  # [K, D] token means: v^X
        if post == "stored":  # centred on the language vectors, unnormalised first
            e = F.normalize(u - stored.unsqueeze(1), dim=-1)
        elif post == "centred":
            e = F.normalize(s - s.mean(dim=1, keepdim=True), dim=-1)
        else:
            e = s
        en, xs = e[0], e[1:]
        cos = torch.einsum("qd,lpd->lqp", en, xs)  # [lang, en q, x q]
        eye = torch.eye(n, dtype=torch.bool)
        pos_c.append(float(cos[:, eye].mean()))
        neg_c.append(float(cos[:, ~eye].mean()))
        # X->en retrieval among all n questions, per language
        bit.append(float((cos.argmax(dim=1) == torch.arange(n)).double().mean()))
        # InfoNCE on random 8-pair batches mixing languages (how training draws pairs); the
        # per-language means come from the batch (>= 2 samples) or the pool (the stored vector).
        pool_mean = s.mean(dim=1)  # [K, D] mean of normalised embeddings
        for _ in range(n_batches):
            picks = [(rng.randrange(1, k), rng.randrange(n)) for _ in range(8)]
            a = s[0, [q for _, q in picks]]
            x = torch.stack([s[lang, q] for lang, q in picks])
            ids = torch.tensor([lang for lang, _ in picks])
            m = torch.stack(
                [
                    x[ids == lang].mean(0) if int((ids == lang).sum()) >= 2 else pool_mean[lang]
                    for lang in range(k)
                ]
            )
            m_en = a.mean(0)
            if post == "stored":
                anc = F.normalize(u[0, [q for _, q in picks]] - stored[0], dim=-1)
                xu = torch.stack([u[lang, q] for lang, q in picks])
                pos = F.normalize(xu - stored[ids], dim=-1)
            elif post == "centred":
                anc = F.normalize(a - m_en, dim=-1)
                pos = F.normalize(x - m[ids], dim=-1)
            else:
                anc = a
                pos = F.normalize(x - m[ids] + m_en, dim=-1)
            sim = anc @ pos.t()
            labels = torch.arange(8)
            for t in TAUS:
                logits = sim / t
                loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
                nce[t].append(float(loss))
        # nearest raw centroid: centroids from the first half, tested on the second half
        half = n // 2
        cent = tok_sum[:, :half].sum(1) / tok_cnt[:, :half].sum(1, keepdim=True)
        test = u[:, half:].reshape(-1, u.shape[-1])
        labels = torch.arange(k).repeat_interleave(n - half)
        pred = torch.cdist(test, cent).argmin(1)
        lid.append(float((pred == labels).double().mean()))
        for i, lang in enumerate(all_langs):
            acc = float((pred[labels == i] == i).double().mean())
            worst[lang] = min(worst.get(lang, 1.0), acc)
    worst_lang = min(worst, key=worst.get)
    return {
        "pos": sum(pos_c) / len(pos_c),
        "neg": sum(neg_c) / len(neg_c),
        "bitext": sum(bit) / len(bit),
        "langid": sum(lid) / len(lid),
        "langid_worst": f"{worst_lang} {worst[worst_lang]:.2f}",
        "nce": {t: sum(v) / len(v) for t, v in nce.items()},
    }


if __name__ == "__main__":
    raise SystemExit(main())
