"""Prompt/response -> token ids with the loss on the response only, through the chat template."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from config.errors import UserError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt
    lang: str
    id: str

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
    prompt = chat_prompt_ids(tokenizer, instruction, system_prompt)
    if tokenizer.chat_template:
        full = _ids(
            tokenizer.apply_chat_template(
                _messages(instruction, system_prompt, response), tokenize=True, return_dict=True
            )
        )
        if full[: len(prompt)] != prompt:
            raise UserError(
                "model.chat_template: the chat template renders the prompt differently with and without the answer; "
                "set model.chat_template to one whose prompt is a prefix of the full dialogue"
            )
    else:
        answer = _ids(tokenizer(response, add_special_tokens=False))
        full = prompt + answer + [tokenizer.eos_token_id]
    full = full[:max_length]
    if len(full) <= len(prompt):
        return None
    labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt) :]
    return Example(input_ids=full, labels=labels, lang=lang, id=id)


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

    def to(self, device: torch.device | str) -> Batch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            lang_ids=self.lang_ids.to(device),
        )

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def num_label_tokens(example: Example) -> int:
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def collate(examples: Sequence[Example], pad_id: int, languages: Sequence[str]) -> Batch:
    """Right-pad to the longest example of the micro-batch."""
    width = max(len(e) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, ex in enumerate(examples):
        input_ids[row, : len(ex)] = torch.tensor(ex.input_ids)
        labels[row, : len(ex)] = torch.tensor(ex.labels)
        mask[row, : len(ex)] = 1
    lang_index = {lang: i for i, lang in enumerate(languages)}
    lang_ids = torch.tensor([lang_index[e.lang] for e in examples], dtype=torch.long)
    return Batch(input_ids, mask, labels, lang_ids)
