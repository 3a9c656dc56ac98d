"""Dialogues -> token ids with the loss on the assistant turns only, through the chat template."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from config.errors import UserError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt
    lang: str
    id: str
    # [start, end) of the positions pooled into sentence embeddings and language means (the
    # instruction's own tokens, `content_span`); None: every position but the first.
    span: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def _ids(encoded) -> list[int]:
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return list(ids)


def chat_prompt_ids(tokenizer, instruction: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt up to where the assistant's answer starts (for generation too)."""
    if tokenizer.chat_template:
        messages = _messages(instruction, system_prompt)
        return _ids(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        )
    text = (system_prompt + "\n\n" if system_prompt else "") + instruction + "\n\n"
    return _ids(tokenizer(text, add_special_tokens=True))


def content_span(tokenizer, instruction: str, system_prompt: str | None = None) -> tuple[int, int]:
    """[start, end) of the instruction's own tokens inside ``chat_prompt_ids``: the positions
    that say something about the sample, without the attention sink (position 0) and the chat
    template's scaffolding (system prompt, role markers), whose hidden states are the same for
    every sample and, at the sink, hundreds of times larger than the rest (docs/shifcon.md).

    Found as what differs from the prompt rendered with an empty instruction (common prefix and
    suffix), so it needs no knowledge of the template; never position 0, never empty.
    """
    ids = chat_prompt_ids(tokenizer, instruction, system_prompt)
    empty = chat_prompt_ids(tokenizer, "", system_prompt)
    start = 0
    while start < min(len(ids), len(empty)) and ids[start] == empty[start]:
        start += 1
    tail = 0
    while tail < min(len(ids), len(empty)) - start and ids[-1 - tail] == empty[-1 - tail]:
        tail += 1
    start, end = max(start, 1), len(ids) - tail
    if end <= start:  # an empty instruction: fall back to everything but the sink
        start, end = min(1, len(ids) - 1), len(ids)
    return start, end


def _messages(instruction: str, system_prompt: str | None, response: str | None = None):
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": instruction})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def encode_example(
    tokenizer,
    instruction: str,
    response: str,
    *,
    lang: str,
    id: str,
    max_length: int,
    system_prompt: str | None = None,
) -> Example | None:
    """None when truncation to `max_length` would leave no response token to learn from."""
    return encode_dialogue(
        tokenizer,
        _messages(instruction, None, response),
        lang=lang,
        id=id,
        max_length=max_length,
        system_prompt=system_prompt,
    )


def encode_dialogue(
    tokenizer,
    messages: Sequence[Mapping[str, str]],
    *,
    lang: str,
    id: str,
    max_length: int,
    system_prompt: str | None = None,
) -> Example | None:
    """One example of a whole conversation with labels on the assistant turns only.

    Each assistant turn's tokens are found as the difference between the dialogue rendered up
    to its generation prompt and rendered through it, so they are exactly what the model
    would be asked to generate at that point.  ``system_prompt`` is used only when the
    conversation has no system message of its own.  None when truncation leaves no label.
    """
    messages = [dict(m) for m in messages]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if tokenizer.chat_template:
        full, spans = _template_spans(tokenizer, messages)
    else:
        full, spans = _plain_spans(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(full)
    for start, end in spans:
        labels[start:end] = full[start:end]
    full, labels = full[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    # Pooled positions: the first user turn's own tokens (the prompt a shift is applied to).
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    span = content_span(tokenizer, first_user, system)
    return Example(input_ids=full, labels=labels, lang=lang, id=id, span=span)


def _template_spans(tokenizer, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    def render(upto: int, generation: bool) -> list[int]:
        return _ids(
            tokenizer.apply_chat_template(
                messages[:upto], add_generation_prompt=generation, tokenize=True, return_dict=True
            )
        )

    full = render(len(messages), False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, through = render(i, True), render(i + 1, False)
        if full[: len(start)] != start or full[: len(through)] != through:
            raise UserError(
                "model.chat_template: the chat template renders the prompt differently with and without the answer; "
                "set model.chat_template to one whose prompt is a prefix of the full dialogue"
            )
        spans.append((len(start), len(through)))
    return full, spans


def _plain_spans(tokenizer, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """No template: ``system\n\nuser\n\n`` then the answer and EOS, turn after turn."""
    full: list[int] = []
    spans = []
    pending = ""
    for message in messages:
        if message["role"] != "assistant":
            pending += message["content"] + "\n\n"
            continue
        full += _ids(tokenizer(pending, add_special_tokens=not full))
        pending = ""
        start = len(full)
        full += _ids(tokenizer(message["content"], add_special_tokens=False))
        full.append(tokenizer.eos_token_id)
        spans.append((start, len(full)))
    if pending:
        full += _ids(tokenizer(pending, add_special_tokens=not full))
    return full, spans


def encode_rows(
    tokenizer,
    rows: Iterable[Mapping[str, Any]],
    languages: Collection[str],
    *,
    max_length: int,
    system_prompt: str | None = None,
) -> tuple[list[Example], int]:
    """Examples of the rows whose ``lang`` is in ``languages`` (others skipped), and how many
    were dropped because truncation left no response token.  A row with ``messages`` (a
    multi-turn conversation, see `data.rows`) is encoded whole."""
    out: list[Example] = []
    dropped = 0
    for row in rows:
        if row["lang"] not in languages:
            continue
        messages = row.get("messages") or _messages(row["instruction"], None, row["response"])
        ex = encode_dialogue(
            tokenizer,
            messages,
            lang=row["lang"],
            id=row["id"],
            max_length=max_length,
            system_prompt=system_prompt,
        )
        if ex is None:
            dropped += 1
        else:
            out.append(ex)
    return out, dropped


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 on content tokens
    labels: torch.Tensor  # [B, T], IGNORE_INDEX on prompt and padding
    lang_ids: torch.Tensor  # [B], index into the run's language list
    # Label tokens of the whole global batch / (data-parallel size x accumulation steps): the
    # micro-batch loss is its token-loss sum over this, so that the accumulated, DP-averaged
    # gradient is the token mean of the global batch whatever the batch layout.
    token_normalizer: float = 1.0
    # [B, 2] (start, end) of the pooled positions per row (`Example.span`); None: all but the
    # first position. Read through `pool_mask`, the one pooling definition.
    spans: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            lang_ids=self.lang_ids.to(device),
            spans=None if self.spans is None else self.spans.to(device),
        )

    def pool_mask(self) -> torch.Tensor:
        """[B, T] 1 on the positions that sentence embeddings and language means average over."""
        if self.spans is None:
            return content_mask(self.attention_mask)
        return content_mask(self.attention_mask, self.spans[:, 0], self.spans[:, 1])

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def content_mask(
    attention_mask: torch.Tensor,
    start: torch.Tensor | None = None,
    end: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one pooling definition: [B, T] 1 on the positions that sentence embeddings (MCL),
    language vectors, the probe and language detection average over.

    Non-padding positions in [start, end) per row (default: the whole row), never position 0:
    the first position is the attention sink, whose hidden state is hundreds of times larger
    than any other (SmolLM2 layer 12: norm ~23,000 vs a median of ~140) and the same for every
    sentence, so a mean that includes it points the same way for all inputs.
    """
    width = attention_mask.shape[1]
    pos = torch.arange(width, device=attention_mask.device).unsqueeze(0)
    keep = attention_mask.bool() & (pos >= 1)
    if start is not None:
        keep &= pos >= start.to(attention_mask.device).unsqueeze(1)
    if end is not None:
        keep &= pos < end.to(attention_mask.device).unsqueeze(1)
    return keep.to(attention_mask.dtype)


def num_label_tokens(example: Example) -> int:
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def _padded(
    seqs: Sequence[Sequence[int]], pad_id: int, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq):
            cols = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, cols] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, cols] = 1
    return ids, mask


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` ids and attention mask, content on the left (training, scoring, probing)."""
    return _padded(seqs, pad_id, left=False)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` ids and attention mask, content on the right (batched generation)."""
    return _padded(seqs, pad_id, left=True)


def collate(examples: Sequence[Example], pad_id: int, languages: Sequence[str]) -> Batch:
    """Right-pad to the longest example of the micro-batch."""
    input_ids, mask = right_pad([e.input_ids for e in examples], pad_id)
    labels, _ = right_pad([e.labels for e in examples], IGNORE_INDEX)
    lang_index = {lang: i for i, lang in enumerate(languages)}
    lang_ids = torch.tensor([lang_index[e.lang] for e in examples], dtype=torch.long)
    spans = torch.tensor([e.span or (1, len(e)) for e in examples], dtype=torch.long)
    return Batch(input_ids, mask, labels, lang_ids, spans=spans)
