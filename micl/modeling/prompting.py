"""Token layout of one sample: media embeddings after a text cue inside the LLM's chat template.

    <chat template up to the user content>{cue}<N media placeholders> {instruction}<... assistant header>
    {target}<eos>

A sample with two media (a video and its sound) has one cue + placeholder block per medium, in
MEDIA_ORDER: `video: <N1 placeholders> audio: <N2 placeholders> {instruction}`.

Placeholders are pad-token ids marked by `media_mask`; the model replaces their embeddings with the
projected media features. Labels are -100 everywhere except on the target tokens and the closing eos.
"""

from __future__ import annotations

from dataclasses import dataclass

MEDIA_MARKER = "<|micl_media|>"
CUES = {"image": "image: ", "audio": "audio: ", "video": "video: ", "text": ""}
#: order of the media blocks within one sample's prompt (MultimodalLM.embed fills them in this order)
MEDIA_ORDER = ("image", "video", "audio")
IGNORE_INDEX = -100


def target_tokens(labels):
    """Number of target tokens a causal LM predicts in a [batch, length] labels tensor (a tensor)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    media_mask: list[bool]


class PromptBuilder:
    def __init__(self, tokenizer, system_prompt: str | None = "", max_target_tokens: int = 64):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_target_tokens = max_target_tokens
        self.use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.end_text = tokenizer.eos_token or ""
        self.placeholder_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _render(self, user_content: str) -> str:
        if self.use_chat_template:
            messages = [{"role": "user", "content": user_content}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        system = f"{self.system_prompt}\n" if self.system_prompt else ""
        return f"{system}User: {user_content}\nAssistant:"

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(self, instruction: str, media_tokens: dict[str, int], target: str | None = None) -> EncodedSample:
        """`media_tokens`: {stream modality: number of media tokens} ({} for a text-only prompt)."""
        unknown = sorted(set(media_tokens) - set(MEDIA_ORDER))
        if unknown:
            raise ValueError(f"unknown media modality {unknown[0]!r} (valid: {', '.join(MEDIA_ORDER)})")
        blocks = [(m, media_tokens[m]) for m in MEDIA_ORDER if media_tokens.get(m)]
        content = "".join(f"{CUES[m]}{MEDIA_MARKER} " for m, _ in blocks) + instruction
        rendered = self._render(content)
        if blocks:
            parts = rendered.split(MEDIA_MARKER)
            bos = [self.tokenizer.bos_token_id] if self._needs_bos(parts[0]) else []
            input_ids = bos + self._tokens(parts[0])
            media_mask = [False] * len(input_ids)
            for (_, count), text in zip(blocks, parts[1:]):
                tokens = self._tokens(text)
                input_ids += [self.placeholder_id] * count + tokens
                media_mask += [True] * count + [False] * len(tokens)
        else:
            bos = [self.tokenizer.bos_token_id] if self._needs_bos(rendered) else []
            input_ids = bos + self._tokens(rendered)
            media_mask = [False] * len(input_ids)
        labels = [IGNORE_INDEX] * len(input_ids)
        if target is not None:
            target_ids = self._tokens((" " if not self.use_chat_template else "") + target)[: self.max_target_tokens]
            target_ids += self._tokens(self.end_text)
            input_ids += target_ids
            labels += target_ids
            media_mask += [False] * len(target_ids)
        return EncodedSample(input_ids, labels, media_mask)

    def _needs_bos(self, rendered_start: str) -> bool:
        """Plain-text prompts of models with a BOS token get it; chat templates write their own."""
        bos = self.tokenizer.bos_token
        return (
            not self.use_chat_template
            and self.tokenizer.bos_token_id is not None
            and not (bos and rendered_start.startswith(bos))
        )
