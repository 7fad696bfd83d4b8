"""Byte-level BPE tokenizer with its special tokens and chat template, saved as two files.

`tokenizer.json` is the `tokenizers` library's own format (readable by `transformers` too);
`tokenizer_config.json` holds what that format cannot: which special token is BOS / EOS / PAD
and the Jinja chat template, in the keys `transformers` uses, so a checkpoint's tokenizer opens
with `AutoTokenizer.from_pretrained` as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import jinja2.sandbox
from tokenizers import Tokenizer as _Tokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from trainer.errors import CheckpointError

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]

# ChatML, the template SmolLM2-Instruct uses; trained tokenizers get the same one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token roles and the chat template."""

    def __init__(
        self,
        tok: _Tokenizer,
        eos_token: str = EOS,
        bos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = CHATML_TEMPLATE,
        stop_tokens: Iterable[str] = (),
    ):
        self.tok = tok
        self.eos_token, self.bos_token = eos_token, bos_token
        self.pad_token = pad_token or eos_token
        self.chat_template = chat_template
        for name in (eos_token, bos_token, self.pad_token, *stop_tokens):
            if name is not None and tok.token_to_id(name) is None:
                raise CheckpointError(f"tokenizer has no token {name!r}")
        self.eos_id = tok.token_to_id(eos_token)
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.pad_id = tok.token_to_id(self.pad_token)
        # tokens that end a generation: EOS and, for chat models, the end-of-turn token
        self.stop_tokens = list(dict.fromkeys([eos_token, *stop_tokens]))
        self.stop_ids = [tok.token_to_id(t) for t in self.stop_tokens]
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (byte-level BPE tokens may be partial UTF-8)."""
        added = self.tok.get_added_tokens_decoder()
        if token_id in added:
            return added[token_id].content.encode()
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return b""
        return bytes(_BYTE_DECODER.get(ch, ord(ch) & 0xFF) for ch in piece)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Applies the chat template (Jinja, sandboxed) to a list of {role, content} messages."""
        if self.chat_template is None:
            raise CheckpointError("this tokenizer has no chat template")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token,
        )

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.tok.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "pad_token": self.pad_token,
            "stop_tokens": self.stop_tokens,
            "chat_template": self.chat_template,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        (folder / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False)
        )

    @classmethod
    def load(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{folder} has no tokenizer.json")
        try:
            tok = _Tokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a valid tokenizer: {e}") from None
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        return cls(
            tok,
            eos_token=_token_str(cfg.get("eos_token")) or EOS,
            bos_token=_token_str(cfg.get("bos_token")),
            pad_token=_token_str(cfg.get("pad_token")),
            chat_template=cfg.get("chat_template"),
            stop_tokens=cfg.get("stop_tokens", ()),
        )


def train_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE on `texts`; the result has SPECIAL_TOKENS and the ChatML template."""
    tok = _Tokenizer(models.BPE())
    # GPT-2 style split, with digits one by one (as SmolLM2 does): better arithmetic, fewer merges
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, eos_token=EOS, chat_template=CHATML_TEMPLATE, stop_tokens=[IM_END])


def _token_str(value) -> str | None:
    # transformers may store a special token as {"content": "...", ...}
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_template_error(message: str):
    raise jinja2.exceptions.TemplateError(message)


def bytes_to_unicode() -> dict[int, str]:
    # the GPT-2 byte ↔ printable-character table that byte-level BPE vocabularies are written in
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_BYTE_DECODER = {ch: b for b, ch in bytes_to_unicode().items()}
