"""A model whose replies are scripted, for end-to-end tests of the real server.

Load it as a model plugin (worker/loader/plugin.py)::

    ENCORE_SCRIPTED_MODEL=script.json encore serve \\
        --model python:tests.helpers.scripted_model:build --tokenizer SmolLM2.gguf

``script.json`` is a list of rules, tried in order; the first whose ``when`` occurs in the
prompt text (decoded with special tokens, so it includes the chat template and any tools
section: pick markers that only a message holds) gives the reply; a rule without ``when``
always matches; no match means an empty reply::

    [{"when": "<tool_response>", "reply": "It is sunny."}, {"reply": "<tool_call>...</tool_call>"}]

How it answers without weights: every token id is written into the sequence's own KV slots
(layer 0, V, as three base-256 digits: exact in any dtype, and V is never re-rotated). For the
last row of each sequence it reads the whole context back through the block table, finds where
the reply starts (after the last assistant header of the chat template) and puts all logit mass
on the next reply token, then on EOS::

    context:  <prompt ... <|im_start|>assistant\\n> <reply 0> <reply 1> ... <reply k-1>
                                               ^ reply_start          next = reply[k] | EOS

The hidden state of a row is simply the id it predicts; ``compute_logits`` one-hots it.
Prompt rows predict the next prompt token, so prompt logprobs are 0. Uses the same tokenizer
as the server (``ModelConfig.tokenizer``, else the embedded SmolLM2 GGUF).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from encore.configs.model_source import default_gguf_path
from encore.configs.types import ModelConfig
from encore.server.tokenizer import EncoreTokenizer, load_tokenizer
from encore.worker.attention.base import AttentionBackend, AttentionMetadata
from encore.worker.models.arch import ModelArch

SCRIPT_ENV = "ENCORE_SCRIPTED_MODEL"
LOGIT = 1e4  # the chosen token's logit; every other token gets 0
_BASE = 256  # digit base: integers up to 256 are exact even in bfloat16
_CACHE_LIMIT = 256  # prompts whose reply ids are remembered


@dataclass(frozen=True)
class Rule:
    reply: str
    when: str | None = None


def load_script(path: str | os.PathLike[str]) -> list[Rule]:
    rules = json.loads(Path(path).read_text())
    return [Rule(reply=r["reply"], when=r.get("when")) for r in rules]


def build(model_config: ModelConfig, device: torch.device, dtype: torch.dtype,
          attn: AttentionBackend) -> tuple[ScriptedModel, ModelArch]:
    """The plugin factory: the script comes from ``$ENCORE_SCRIPTED_MODEL``."""
    path = os.environ.get(SCRIPT_ENV)
    if not path:
        raise ValueError(f"the scripted model needs ${SCRIPT_ENV} (a JSON list of rules)")
    tok = load_tokenizer(model_config.tokenizer or str(default_gguf_path()))
    arch = ModelArch(vocab_size=tok.vocab_size, hidden_size=1, intermediate_size=1,
                     num_layers=1, num_heads=1, num_kv_heads=1, head_dim=4,
                     max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                     eos_token_ids=list(tok.eos_token_ids), architecture="ScriptedModel")
    return ScriptedModel(tok, load_script(path), arch.vocab_size).to(device), arch


class ScriptedModel(torch.nn.Module):
    """Same call interface as LlamaForCausalLM; no parameters."""

    def __init__(self, tokenizer: EncoreTokenizer, rules: list[Rule], vocab_size: int) -> None:
        super().__init__()
        self.tok, self.rules, self.vocab_size = tokenizer, rules, vocab_size
        self.eos = tokenizer.eos_token_ids[0]
        self.header = tokenizer.encode(assistant_header(tokenizer))
        self._replies: dict[tuple[int, ...], list[int]] = {}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """[T] ids -> [T, 1] fp32: the id each row predicts. Writes ids into ``kv_caches[0]``."""
        values = kv_caches[0][1].flatten(0, 1)  # [slots, 1, head_dim], a view
        values.index_copy_(0, meta.slot_mapping, _digits(input_ids).to(values.dtype))
        nxt = torch.cat([input_ids[1:], input_ids[-1:]]).tolist()  # prompt rows: next prompt id
        end = 0
        for i, (start, qlen) in enumerate(zip(meta.start_pos, meta.query_lens, strict=True)):
            end += qlen
            context = _read_ids(kv_caches[0], meta.block_tables[i], start + qlen)
            nxt[end - 1] = self.next_token(context)
        return torch.tensor(nxt, dtype=torch.float32, device=input_ids.device)[:, None]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """All mass on the id each row holds: [n, 1] -> [n, V] fp32."""
        logits = torch.zeros(hidden.shape[0], self.vocab_size, dtype=torch.float32,
                             device=hidden.device) if out is None else out.zero_()
        return logits.scatter_(1, hidden.round().long(), LOGIT)

    def next_token(self, context: list[int]) -> int:
        start = _last_end_of(context, self.header)
        if start is None:
            return self.eos
        reply = self.reply_ids(tuple(context[:start]))
        k = len(context) - start
        return reply[k] if k < len(reply) else self.eos

    def reply_ids(self, prompt: tuple[int, ...]) -> list[int]:
        if prompt not in self._replies:
            if len(self._replies) >= _CACHE_LIMIT:
                self._replies.clear()
            text = self.tok.decode(list(prompt), skip_special_tokens=False)
            reply = next((r.reply for r in self.rules if r.when is None or r.when in text), "")
            self._replies[prompt] = self.tok.encode(reply)
        return self._replies[prompt]


def assistant_header(tok: EncoreTokenizer) -> str:
    """What the chat template adds for ``add_generation_prompt`` (``<|im_start|>assistant\\n``)."""
    messages = [{"role": "user", "content": "x"}]
    with_prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    without = tok.apply_chat_template(messages, add_generation_prompt=False)
    if not with_prompt.startswith(without) or with_prompt == without:
        raise ValueError("the scripted model needs a chat template with a generation prompt")
    return with_prompt[len(without):]


def _digits(ids: torch.Tensor) -> torch.Tensor:
    """[T] ids -> [T, 4] values: three base-256 digits and a zero (one KV head of dim 4)."""
    ids = ids.long()
    cols = [ids % _BASE, ids // _BASE % _BASE, ids // _BASE**2, torch.zeros_like(ids)]
    return torch.stack(cols, dim=1)[:, None, :]  # [T, 1 head, 4]


def _read_ids(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> list[int]:
    """Ids of positions [0, seq_len) of one sequence, read back from V."""
    block_size = kv_cache.shape[2]
    blocks = block_table[:(seq_len + block_size - 1) // block_size].long()
    d = kv_cache[1, blocks].flatten(0, 1)[:seq_len, 0].round().long()  # [seq_len, 4]
    return (d[:, 0] + d[:, 1] * _BASE + d[:, 2] * _BASE**2).tolist()


def _last_end_of(seq: list[int], pattern: list[int]) -> int | None:
    """Index just past the last occurrence of ``pattern`` in ``seq``, or None."""
    n = len(pattern)
    for i in range(len(seq) - n, -1, -1):
        if seq[i:i + n] == pattern:
            return i + n
    return None
