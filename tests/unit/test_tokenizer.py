"""server.tokenizer against transformers: same ids, same decoded text, same chat prompt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from encore.configs.model_source import default_gguf_path
from encore.server.tokenizer import TokenizerLoadError, load_tokenizer, read_gguf_metadata
from tests.helpers.tiny_models import save_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "  leading spaces\n\nand newlines\t tabs  ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé: café, naïve, Straße; 日本語のテキスト; Привет; emoji 🙂👍🏽",
    "def f(x):\r\n    return x ** 2  # comment\n",
    "I'm sure they've said it's 12345678 o'clock, isn't it?",
    "<|endoftext|>between<repo_name>specials<file_sep>",
    "",
    " ",
    "\n\n\n",
    "a" * 50 + " " + "😀" * 3,
]

CHATS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a color.\nJust one."},
    ],
    [{"role": "user", "content": "What's 2+2?"}],
    [
        {"role": "system", "content": "Talk like a pirate 🏴‍☠️."},
        {"role": "user", "content": "Where's the treasure?"},
        {"role": "assistant", "content": "Arr, buried deep."},
        {"role": "user", "content": "  spaces and\ttabs  "},
    ],
]


@pytest.fixture(scope="module")
def gguf_pair():
    path = default_gguf_path()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return load_tokenizer(str(path)), ref


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_decode_match_transformers(gguf_pair, text):
    ours, ref = gguf_pair
    ids = ref(text, add_special_tokens=False).input_ids
    assert ours.encode(text) == ids
    assert ours.encode(text, add_special_tokens=True) == ref(text).input_ids
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
            ids, skip_special_tokens=skip
        )


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_text_reads_special_tokens_as_text(gguf_pair, text):
    """What a client types is text: transformers' split_special_tokens gives the same ids."""
    ours, ref = gguf_pair
    ids = ours.encode_text(text)
    assert ids == ref(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert not any(ours.is_special(i) for i in ids)
    assert ours.decode(ids, skip_special_tokens=False) == text


def test_gguf_long_text_encodes_the_same_without_holding_the_gil(gguf_pair):
    ours, ref = gguf_pair
    text = "\n".join(TEXTS) * 400  # beyond the length where encode releases the GIL
    assert len(text) > 20_000
    assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids
    assert ours.encode_text(text) == ref(text, add_special_tokens=False,
                                         split_special_tokens=True).input_ids


def test_gguf_special_ids(gguf_pair):
    ours, ref = gguf_pair
    assert ours.vocab_size == len(ref) == 49152
    assert ours.bos_token_id == ref.bos_token_id == 1
    assert ours.eos_token_ids == [ref.eos_token_id] == [2]  # <|im_end|> ends a chat turn
    assert ours.id_to_token(2) == "<|im_end|>" and not ours.add_bos_token
    assert ours.convert_ids_to_tokens([1, 2]) == ref.convert_ids_to_tokens([1, 2])
    assert ours.is_special(0) and not ours.is_special(100)


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template_matches_transformers(gguf_pair, chat, add_generation_prompt):
    ours, ref = gguf_pair
    assert ours.has_chat_template
    expected = ref.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected


TOOL_TEMPLATE = (
    "{%- set ns = namespace(n=0) -%}"
    "{%- if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('bad role ' + m['role']) }}{%- endif -%}"
    "{%- set ns.n = ns.n + 1 -%}"
    "{{ bos_token }}{{ m['role'] }}: {{ m['content'] | trim }}{{ eos_token }}\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}assistant ({{ ns.n }} msgs{{ ', ' + extra if extra }}):"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def hf_dir_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(path, chat_template=TOOL_TEMPLATE)
    return load_tokenizer(str(path)), transformers.AutoTokenizer.from_pretrained(str(path))


def test_hf_dir_encode_matches_transformers(hf_dir_pair):
    ours, ref = hf_dir_pair
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids
        ids = ref(text).input_ids
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_ids == [2] and ours.bos_token_id == 1


def test_hf_dir_template_with_tools_and_kwargs_matches(hf_dir_pair):
    ours, ref = hf_dir_pair
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Wetter <é>",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    for chat in CHATS:
        got = ours.apply_chat_template(chat, tools=tools, extra="x")
        assert got == ref.apply_chat_template(
            chat, tools=tools, tokenize=False, add_generation_prompt=True, extra="x"
        )
    assert "<é>" in got  # tojson does not HTML-escape


def test_template_raise_exception_surfaces(hf_dir_pair):
    import jinja2

    ours, _ = hf_dir_pair
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role"):
        ours.apply_chat_template([{"role": "wizard", "content": "x"}])


def test_template_is_sandboxed(hf_dir_pair):
    import jinja2

    from encore.server.tokenizer import EncoreTokenizer

    ours, _ = hf_dir_pair
    evil = EncoreTokenizer(
        ours._tok,
        bos_token=None,
        eos_token=None,
        chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}",
    )
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template([])


def test_tokenizer_module_is_torch_free():
    code = (
        "import sys, encore.server.tokenizer, encore.configs.model_source; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": ""},
    )


def test_gguf_metadata_reader_matches_gguf_package():
    import gguf

    path = default_gguf_path()
    ours = read_gguf_metadata(path)
    reader = gguf.GGUFReader(str(path))
    for key in (
        "general.architecture",
        "llama.block_count",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.chat_template",
        "llama.rope.freq_base",
    ):
        assert ours[key] == pytest.approx(reader.fields[key].contents())
    assert (
        ours["tokenizer.ggml.tokens"][:20] == reader.fields["tokenizer.ggml.tokens"].contents()[:20]
    )


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(TokenizerLoadError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all, just bytes")
    with pytest.raises(TokenizerLoadError, match="not a GGUF"):
        load_tokenizer(str(bad))


def test_tiny_gguf_tokenizer_matches_transformers(tmp_path):
    from tests.helpers.tiny_models import make_tiny_gguf

    path, _ = make_tiny_gguf(tmp_path / "tiny.gguf")
    ours = load_tokenizer(str(path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids
    for chat in CHATS:
        assert ours.apply_chat_template(chat) == ref.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )
    assert ours.eos_token_ids == [2] and ours.vocab_size == len(ref)
