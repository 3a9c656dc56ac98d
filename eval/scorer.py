"""The scoring interface every benchmark talks to, and its Hugging Face implementation.

Tasks never touch a model directly: they ask a :class:`Scorer` for conditional
log-likelihoods, greedy generations or mean-pooled hidden states. ``HFScorer`` implements it
for a plain ``transformers`` causal LM (an exported run or a backbone); a training engine
implements the same three methods on a partitioned (ZeRO-3 / TP / PP) model
(``eval.engine.EngineScorer``), and every task works unchanged.

Batching: scoring pads on the right (positions stay 0..n-1, and the scored slice of each row
is read at its own offsets); generation pads on the left, so that every row's next token is
read at the last column. Requests are sorted by length inside the scorer to keep padding low;
results come back in request order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from data.formatting import chat_prompt_ids, content_mask, left_pad, right_pad


@dataclass(frozen=True)
class LoglikelihoodResult:
    """log p(continuation | context) summed over the continuation's tokens."""

    logprob: float
    num_tokens: int
    greedy: bool  # every continuation token was the model's argmax


@runtime_checkable
class Scorer(Protocol):
    """What a benchmark needs from a model; implement it for any engine."""

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LoglikelihoodResult]:
        """Score each (context, continuation); an empty context scores the whole text."""
        ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy completions of user prompts (chat-formatted when the model has a template)."""
        ...

    def hidden_states(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, L+1, D]`` float32: each layer's output mean-pooled over the text's tokens
        after the first (index 0 = embeddings, l = output of decoder layer l)."""
        ...


def continuation_logprob(
    logits: torch.Tensor, full: Sequence[int], n_cont: int
) -> LoglikelihoodResult:
    """Score the last ``n_cont`` tokens of ``full`` from the logits ``[T, V]`` of ``full[:-1]``
    (row ``t`` predicts token ``t + 1``; padding after ``len(full) - 1`` is never read)."""
    if n_cont == 0:
        return LoglikelihoodResult(0.0, 0, True)
    start = len(full) - 1 - n_cont
    row_logits = logits[start : len(full) - 1].float()
    logprobs = torch.log_softmax(row_logits, dim=-1)
    target = torch.tensor(list(full[-n_cont:]), device=logprobs.device)
    picked = logprobs.gather(1, target[:, None]).squeeze(1)
    greedy = bool((row_logits.argmax(dim=-1) == target).all())
    return LoglikelihoodResult(float(picked.sum()), n_cont, greedy)


def _ids(encoded: Any) -> list[int]:
    return list(encoded["input_ids"] if not isinstance(encoded, list) else encoded)


def speaking(scorer: Any, lang: str) -> AbstractContextManager[None]:
    """Tell a scorer which language it is scoring, for models whose forward depends on it
    (a ShifCon export shifts each language by its own vectors); a no-op for the others."""
    context = getattr(scorer, "language", None)
    return context(lang) if context is not None else nullcontext()


class TextEncoder:
    """Tokenisation shared by every scorer, so an export and a training engine score the very
    same ids (only the forward differs).

    ``chat``: format generation prompts with the tokenizer's chat template (the format the
    training pipeline uses, ``data.formatting.chat_prompt_ids``); log-likelihood and hidden
    states always score raw text, as multiple-choice benchmarks are defined on raw text.
    ``stop_ids``: tokens that end a generated answer (EOS of the model and tokenizer, pad).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        batch_size: int,
        chat: bool,
        system_prompt: str | None,
        max_length: int,
        stop_ids: set[int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.chat = chat and bool(getattr(tokenizer, "chat_template", None))
        self.system_prompt = system_prompt
        self.max_length = max_length
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
        self.stop_ids = {self.pad_id, *eos_ids(None, tokenizer), *(stop_ids or ())}

    # -- tokenisation --------------------------------------------------------------------------

    def prefix_ids(self) -> list[int]:
        """What scores the first token of a context-free text: BOS, else EOS as a separator."""
        for token in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if token is not None:
                return [int(token)]
        return []

    def encode_text(self, text: str) -> list[int]:
        return _ids(self.tokenizer(text, add_special_tokens=True))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids whose concatenation is how the full text tokenises.

        Encoding the joined text and splitting it at the context's length keeps merges across
        the boundary as the model would see them; when the context's tokens are not a prefix of
        the full text's, the two parts are encoded separately and concatenated.
        """
        if not continuation:
            raise ValueError("empty continuation: nothing to score")
        if not context:
            ctx = self.prefix_ids()
            cont = _ids(self.tokenizer(continuation, add_special_tokens=False))
            if not ctx:  # no BOS/EOS: the first token conditions the rest
                ctx, cont = cont[:1], cont[1:]
            return ctx, cont
        ctx = self.encode_text(context)
        full = self.encode_text(context + continuation)
        if full[: len(ctx)] == ctx and len(full) > len(ctx):
            return ctx, full[len(ctx) :]
        return ctx, _ids(self.tokenizer(continuation, add_special_tokens=False))

    def encode_request(self, context: str, continuation: str) -> tuple[list[int], int]:
        """(full ids, number of continuation tokens), cut on the left to fit ``max_length``."""
        ctx, cont = self.encode_pair(context, continuation)
        full = (ctx + cont)[-(self.max_length + 1) :]  # the last token is only ever a target
        return full, min(len(cont), len(full) - 1)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Generation prompt ids: chat template with the assistant turn opened, or raw text."""
        if self.chat:
            return chat_prompt_ids(self.tokenizer, prompt, self.system_prompt)
        return self.encode_text(prompt)

    def hidden_inputs(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids whose hidden states are pooled (raw text, cut to ``max_length``)."""
        encoded = [self.encode_text(t)[: self.max_length] for t in texts]
        if any(not e for e in encoded):
            raise ValueError("an empty text has no hidden states to pool")
        return encoded

    def decode(self, new_ids: torch.Tensor | Sequence[int]) -> str:
        """Text of generated ids, stopping at the first stop id (rows finish at different steps)."""
        tokens = []
        for token in new_ids.tolist() if isinstance(new_ids, torch.Tensor) else new_ids:
            if token in self.stop_ids:
                break
            tokens.append(token)
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


class BatchedScorer(TextEncoder):
    """The :class:`Scorer` calls every implementation shares: encode, sort by length, batch,
    score, hand results back in request order. A subclass gives the forward of right-padded
    rows (``row_logits``), batched greedy decoding (``generate_rows``) and, where a forward is
    a collective, filler rounds (``batch_rounds``)."""

    def grad_mode(self) -> AbstractContextManager[Any]:
        """No autograd while scoring (the engine scorer keeps plain ``no_grad``)."""
        return torch.inference_mode()

    def batch_rounds(self, order: Sequence[int]) -> list[list[int]]:
        """Request indices per forward; an empty round is a filler forward (no requests)."""
        size = self.batch_size
        return [list(order[i : i + size]) for i in range(0, len(order), size)]

    def row_logits(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[B, T, V]`` logits of the right-padded ``seqs``."""
        raise NotImplementedError

    def generate_rows(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> Sequence[torch.Tensor | Sequence[int]]:
        """Greedy new ids per prompt (decoding stops at the first stop id)."""
        raise NotImplementedError

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LoglikelihoodResult]:
        return self.score_encoded([self.encode_request(ctx, cont) for ctx, cont in requests])

    def score_encoded(self, encoded: Sequence[tuple[list[int], int]]) -> list[LoglikelihoodResult]:
        """Score already-tokenised (full ids, continuation length) rows, e.g. the rolling
        windows of a long text (``eval.harness``)."""
        results: list[LoglikelihoodResult | None] = [None] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        with self.grad_mode():
            for chunk in self.batch_rounds(order):
                logits = self.row_logits([encoded[i][0][:-1] for i in chunk])
                for row, i in enumerate(chunk):
                    full, n_cont = encoded[i]
                    results[i] = continuation_logprob(logits[row], full, n_cont)
        return [r for r in results if r is not None]

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()
    ) -> list[str]:
        """Greedy answers; ``stop`` cuts each text at the first stop string (post hoc)."""
        encoded = [self.prompt_ids(p) for p in prompts]
        texts: list[str] = [""] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        with self.grad_mode():
            for chunk in self.batch_rounds(order):
                new = self.generate_rows([encoded[i] for i in chunk], max_new_tokens)
                for row, i in enumerate(chunk):
                    texts[i] = cut_at_stop(self.decode(new[row]), stop)
        return texts


class HFScorer(BatchedScorer):
    """:class:`Scorer` over a ``transformers`` causal LM and its tokenizer (single process)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        chat: bool = True,
        system_prompt: str | None = None,
        max_length: int | None = None,
        shift: Any = None,
    ) -> None:
        """``shift``: the `ShifConHooks` of a ShifCon export; `language` then shifts each
        benchmark language by its vectors (languages without vectors stay unshifted)."""
        config_max = getattr(model.config, "max_position_embeddings", None) or 2048
        super().__init__(
            tokenizer,
            batch_size=batch_size,
            chat=chat,
            system_prompt=system_prompt,
            max_length=max_length or int(config_max),
            stop_ids=eos_ids(model, tokenizer),
        )
        self.model = model
        self.shift = shift

    @contextmanager
    def language(self, lang: str) -> Iterator[None]:
        if self.shift is None or lang not in self.shift.languages:
            yield
            return
        with self.shift.inference_languages(torch.tensor(self.shift.languages.index(lang))):
            yield

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    # -- Scorer --------------------------------------------------------------------------------

    def row_logits(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        ids, mask = right_pad(seqs, self.pad_id)
        return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits

    def generate_rows(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> torch.Tensor:
        ids, mask = left_pad(prompts, self.pad_id)
        return self.generate_ids(ids, mask, max_new_tokens)

    def generate_ids(
        self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, **kwargs: Any
    ) -> torch.Tensor:
        """Greedy continuation ids ``[B, <= max_new_tokens]`` of a left-padded batch
        (``kwargs`` go to ``generate``, e.g. a prefilled ``past_key_values``)."""
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            **kwargs,
        )
        return out[:, ids.shape[1] :].cpu()

    @torch.inference_mode()
    def hidden_states(self, texts: Sequence[str]) -> torch.Tensor:
        encoded = self.hidden_inputs(texts)
        if not encoded:  # a rank without a share of the texts
            size = int(self.model.config.hidden_size)
            return torch.zeros(0, self.num_layers + 1, size)
        pooled: list[torch.Tensor | None] = [None] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        for chunk in self.batch_rounds(order):
            ids, mask = right_pad([encoded[i] for i in chunk], self.pad_id)
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                output_hidden_states=True,
            )
            means = mean_pool_layers(out.hidden_states, mask)
            for row, i in enumerate(chunk):
                pooled[i] = means[row].cpu()
        return torch.stack([p for p in pooled if p is not None])


def mean_pool_layers(hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """``[B, L+1, D]`` float32: each layer's ``[B, T, D]`` output averaged over the text's tokens
    but the first (`data.formatting.content_mask`: the attention sink would dominate the mean);
    a one-token text keeps its one token."""
    states = torch.stack(tuple(hidden_states), dim=1).float()  # [B, L+1, T, D]
    pooled = content_mask(mask)
    pooled = torch.where((pooled.sum(dim=1) == 0).unsqueeze(1), mask, pooled)
    weights = pooled.to(states.device, torch.float32)[:, None, :, None]
    return ((states * weights).sum(dim=2) / weights.sum(dim=2)).cpu()


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids of the model's generation config and of the tokenizer."""
    found: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            found.add(eos)
        elif isinstance(eos, list | tuple):
            found.update(int(e) for e in eos)
    return found


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        at = text.find(s)
        if s and at != -1:
            cut = min(cut, at)
    return text[:cut]


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | None = None,
) -> tuple[Any, Any]:
    """Model and tokenizer from an export directory or any backbone spec ``model.backbone`` takes.

    Backbone resolution (GGUF conversion, embedded models, hub cache) is the training
    pipeline's, so evaluation loads exactly what a recipe would.
    """
    from transformers import AutoModelForCausalLM

    from config.schema import ModelSection
    from model.backbone import load_tokenizer, resolve_backbone

    section = ModelSection(backbone=str(spec), attn_implementation=attn_implementation)  # type: ignore[arg-type]
    resolved = resolve_backbone(section)
    tokenizer = load_tokenizer(resolved, section)
    model = AutoModelForCausalLM.from_pretrained(
        Path(resolved.path), dtype=dtype, attn_implementation=attn_implementation
    )
    model.eval()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    return model, tokenizer
