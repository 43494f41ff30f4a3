"""Tokenizer and chat template for the API process (no torch, no transformers).

``load_tokenizer(source)`` takes a GGUF file or a Hugging Face directory (tokenizer.json +
tokenizer_config.json, chat template inline or in chat_template.jinja). For a GGUF with a
byte-level BPE vocabulary (``tokenizer.ggml.model == "gpt2"``) the ``tokenizers.Tokenizer`` is
rebuilt from the metadata the same way transformers does, so ids match it exactly.

Chat templates render in jinja2's ImmutableSandboxedEnvironment with the same settings,
globals and filters as transformers' ``apply_chat_template(..., tokenize=False)``.
"""

from __future__ import annotations

import functools
import json
import struct
from array import array
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

_SPECIAL_ATTRS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


class TokenizerLoadError(ValueError):
    """The tokenizer source is missing or unsupported; one line, says why."""


class EncoreTokenizer:
    """Text <-> ids, special tokens, and the chat template of one model."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        add_bos_token: bool = False,
        extra_eos_ids: list[int] | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = self._id(bos_token)
        eos = [self._id(eos_token), *(extra_eos_ids or [])]
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in eos if i is not None))
        self.special_tokens_map = {k: v for k, v in (special_tokens or {}).items() if v}
        self._special_ids = {
            t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special
        }
        # the special (control) tokens' strings; in client text they are text (encode_text)
        self.special_token_strings: tuple[str, ...] = tuple(sorted(self._special_ids))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text`` (special-token strings in it become those tokens); with
        add_special_tokens, a BOS when the model wants one."""
        return _encode(self._tok, text, add_special_tokens)

    def encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` read as plain text: ``"<|im_end|>"`` typed by a client becomes
        ordinary tokens, never the control token (added tokens that are not special, such as
        a model's ``<tool_call>``, still match, as in encode)."""
        return _encode(self._text_tok, text, False)

    @functools.cached_property
    def _text_tok(self) -> Tokenizer:
        """A copy of the tokenizer that does not match special tokens in text."""
        copy = Tokenizer.from_str(self._tok.to_str())
        copy.encode_special_tokens = True
        return copy

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The tokenizer as a Hugging Face ``tokenizer.json`` string (for the grammar engine)."""
        return self._tok.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._tok.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return self._tok.id_to_token(token_id) in self._special_ids

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt string, exactly as transformers renders it (tokenize=False)."""
        if not self.chat_template:
            raise ValueError(
                "this model has no chat template; use /v1/completions or pass a chat template"
            )
        context = {**self.special_tokens_map, **kwargs}
        return _compile(self.chat_template).render(
            messages=[_alias_reasoning(m) for m in messages],
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **context,
        )


# Tokenizer.encode holds the GIL for the whole text (seconds for megabytes), stalling the API
# process's event loop even from a worker thread; encode_batch releases it. Same ids.
_GIL_FREE_CHARS = 16384


def _encode(tok: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) < _GIL_FREE_CHARS:
        return tok.encode(text, add_special_tokens=add_special_tokens).ids
    return tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


# ---- chat template environment (mirrors transformers.utils.chat_template_utils) ------------


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A namespace that refuses dunder/underscore attributes (as transformers')."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja's signature trick)
        self, args = args[0], args[1:]
        for name in dict(*args, **kwargs):
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, dict(*args, **kwargs))

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes, got {name!r}"
            )


class _TemplateDict:
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (we track no masks)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    return env.from_string(template)


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """transformers fills ``reasoning_content`` and ``thinking`` from either name."""
    reasoning = next(
        (
            message[k]
            for k in ("reasoning_content", "thinking", "reasoning")
            if message.get(k) is not None
        ),
        None,
    )
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


# ---- loading --------------------------------------------------------------------------------


def load_tokenizer(source: str) -> EncoreTokenizer:
    """From a ``.gguf`` file or a Hugging Face directory; TokenizerLoadError otherwise."""
    path = Path(source).expanduser()
    if not source or not path.exists():
        raise TokenizerLoadError(
            f"tokenizer source '{source}' does not exist (Encore never downloads from a hub)"
        )
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _from_gguf(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return _from_hf_dir(path)
    raise TokenizerLoadError(
        f"'{source}' is neither a .gguf file nor a directory with tokenizer.json"
    )


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _from_hf_dir(path: Path) -> EncoreTokenizer:
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    template = cfg.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: use "default"
        template = {t["name"]: t["template"] for t in template}.get("default")
    specials = {k: _token_str(cfg.get(k)) for k in _SPECIAL_ATTRS}
    extra_eos = _generation_eos(path)
    return EncoreTokenizer(
        tok,
        bos_token=specials["bos_token"],
        eos_token=specials["eos_token"],
        chat_template=template,
        add_bos_token=bool(cfg.get("add_bos_token")),
        extra_eos_ids=extra_eos,
        special_tokens=specials,
    )


def _generation_eos(path: Path) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            ids += [] if eos is None else eos if isinstance(eos, list) else [eos]
    return ids


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _from_gguf(path: Path) -> EncoreTokenizer:
    metadata = read_gguf_metadata(path)

    def meta(key: str, default: Any = None) -> Any:
        return metadata.get(key, default)

    kind = meta("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerLoadError(
            f"GGUF tokenizer model {kind!r} in '{path}' is not supported "
            "(supported: gpt2 byte-level BPE)"
        )
    tokens: list[str] = meta("tokenizer.ggml.tokens")
    types: list[int] = meta("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ")) for m in meta("tokenizer.ggml.merges") or []]
    tok = _byte_level_bpe(tokens, merges)
    _add_gguf_specials(tok, tokens, types)

    def name(key: str) -> str | None:
        i = meta(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None else None

    bos, add_bos = name("bos_token_id"), bool(meta("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    extra = [meta(f"tokenizer.ggml.{k}") for k in ("eot_token_id", "eom_token_id")]
    specials = {
        "bos_token": bos,
        "eos_token": name("eos_token_id"),
        "unk_token": name("unknown_token_id"),
        "pad_token": name("padding_token_id"),
        "sep_token": name("seperator_token_id"),
    }
    return EncoreTokenizer(
        tok,
        bos_token=bos,
        eos_token=specials["eos_token"],
        chat_template=meta("tokenizer.chat_template"),
        add_bos_token=add_bos,
        extra_eos_ids=[int(e) for e in extra if e is not None],
        special_tokens=specials,
    )


def _byte_level_bpe(tokens: list[str], merges: list[tuple[str, ...]]) -> Tokenizer:
    """GPT-2 style BPE; tokens not spelled in the byte alphabet are re-spelled into it."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_gguf_specials(tok: Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens (type 3) become special added tokens, user-defined (4) plain added ones,
    so both match whole in text. A 'control' token outside the byte alphabet is a llama.cpp
    mislabel and is skipped, as transformers does."""
    alphabet = set(_bytes_to_unicode().values())
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types, strict=False)
        if ty == _GGUF_CONTROL and set(t) <= alphabet
    ]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty == _GGUF_USER_DEFINED and t in vocab
    ]
    if user:
        tok.add_tokens(user)


# ---- a small GGUF metadata reader ----------------------------------------------------------
# gguf.GGUFReader maps every tensor and builds numpy views for each of the ~100k vocabulary
# strings (seconds); the API process needs only the key/value section, read here in one pass.

_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_ARRAY_CODES = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "B",
    10: "Q",
    11: "q",
    12: "d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def need(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise IndexError("GGUF metadata runs past the bytes read")

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.need(n)
        self.pos += n
        return self.data[self.pos - n : self.pos].decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype in _ARRAY_CODES:
                items = array(_ARRAY_CODES[itype])
                self.need(count * items.itemsize)
                end = self.pos + count * items.itemsize
                items.frombytes(self.data[self.pos : end])
                self.pos = end
                return [bool(x) for x in items] if itype == 7 else items.tolist()
            return [self.value(itype) for _ in range(count)]
        if vtype not in _GGUF_SCALARS:
            raise TokenizerLoadError(f"unknown GGUF value type {vtype}")
        return self.unpack(_GGUF_SCALARS[vtype])


def read_gguf_metadata(path: Path | str) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (little-endian, versions 2 and 3)."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise TokenizerLoadError(f"'{path}' is not a GGUF file")
        version, _, kv_count = struct.unpack_from("<IQQ", head, 4)
        if version not in (2, 3):
            raise TokenizerLoadError(f"'{path}': GGUF version {version} is not supported")
        size = 1 << 20
        while True:  # grow the read until the whole key/value section parses
            f.seek(0)
            cur = _Cursor(f.read(size))
            cur.pos = 24
            try:
                return {cur.string(): cur.value(cur.unpack("<I")) for _ in range(kv_count)}
            except (struct.error, UnicodeDecodeError, IndexError):
                if size > (1 << 31):
                    raise
                size *= 4
