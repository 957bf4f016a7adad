# tokenizer.py against reference tokenizers; nothing here reaches the network. What each comparison proves:
# - SmolLM2 and Qwen2.5-Coder GGUFs: ids, decoded text and chat ids equal transformers' own GGUF tokenizer loader,
#   and the folder written by write_tokenizer_from_gguf gives the same as the GGUF (and loads in transformers).
#   For SmolLM2 the reference gets the pre-tokenizer of SmolLM2's published tokenizer.json (digits split one by one,
#   which is also llama.cpp's "smollm" pre-tokenizer): transformers' GGUF loader uses plain GPT-2 splitting there,
#   which differs on whitespace followed by digits ("\n\n2024").
# - sentencepiece: a small SPM model trained here, against transformers' LlamaTokenizer set up like Llama-2's
#   published tokenizer.json (legacy: a "▁" before every stretch of text); the same model written into a GGUF
#   ("llama" tokenizer) against sentencepiece itself, which checks the merges rebuilt from piece scores.
# - tiktoken: rank files made from the Qwen2.5 vocab (ranks = ids). As qwen.tiktoken (Qwen 1 layout) it is checked
#   against the Qwen2.5 GGUF reference (same ranks, same regex, same first three special ids); as a Llama-3
#   tokenizer.model against transformers' own tiktoken converter, which uses the Llama-3 regex.
# - fallback chat formats: rendered by our Jinja setup and by transformers' renderer with the same template, and
#   compared with the formats Meta documents. The special-token layout of bare tiktoken files (no config) has no
#   oracle beyond the published layout that the Llama-3 test writes into its tokenizer_config.json.
import base64
import json
import random
import shutil
import unicodedata

import pytest
import sentencepiece
from gguf import GGUFReader, GGUFWriter
from tokenizers import normalizers, pre_tokenizers
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

from scripts.offline_models import gguf_path
from tokenizer import (CHATML_TEMPLATE, LLAMA2_TEMPLATE, LLAMA3_TEMPLATE, TokenizerError, get_tokenizer,
                       render_chat, write_tokenizer_from_gguf)

TEXTS = [
    "Hello, world!",
    "Café naïve résumé Ångström, Straße, déjà vu",
    "日本語のテキスト、中文字符。한국어 문장",
    "emoji 🤗🚀 skin tone 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "  two leading spaces, then   runs of    spaces  ",
    "tabs\tand\t\ttabs\nnew\n\n\nlines\r\nwindows \n \n",
    "def square(x: int) -> int:\n    return x ** 2  # comment\n\nprint(square(12))\n",
    "if (a != b && c <= 0x1F) { return arr[i]++; }",
    "digits 0 12 345 6789 1234567890 3.14159 1,000,000 2024-06-01",
    "I'm sure we'll see they've done it; DON'T SHOUT, it's 'quoted'",
    "https://example.com/path?q=a+b&x=%20",
    " ",
    "\n",
    "",
]

CHATS = [
    [{"role": "system", "content": "You are terse. Answer in one line."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And in Python?\n```python\nprint(2 + 2)\n```"}],
    [{"role": "user", "content": "Bonjour ! Ça va ? 🤗"}],
    [{"role": "system", "content": "Système: réponds en français."},
     {"role": "user", "content": "  spaces  and\ttabs\n"},
     {"role": "assistant", "content": "D'accord."},
     {"role": "user", "content": "日本語で？"}],
]

POOL = list("abcXYZ019.,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`") + [
    " ", "  ", "\t", "\n", "\r\n", "\n\n", "é", "ß", "Å", "日本", "中文", "한국어", "🤗", "👍🏽", "the", " quick",
    "'s", "'LL", "123", "4567", "Straße", "printf(", "<|", "|>", "<s", "im_"]


def fuzz(specials, n=150, seed=0) -> list[str]:
    """Random strings of awkward pieces and special-token texts, reproducible."""
    rng = random.Random(seed)
    pool = POOL + list(specials)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def ref_chat_ids(ref, chat, add_generation_prompt=True, **kwargs) -> list[int]:
    out = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=add_generation_prompt, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def assert_same_ids(ours, ref, texts):
    for text in texts:
        ids = ref.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, f"encode {text!r}"
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), f"decode {text!r}"


# ---- the real GGUF models ----

ORIGINAL_PRE_TOKENIZERS = {"SmolLM2-135M-Instruct": pre_tokenizers.Sequence([
    pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])}


class GGUFModel:
    """One real model: its GGUF, our tokenizer from it, the folder we convert it to, and transformers' tokenizer."""

    def __init__(self, name, tmp):
        self.path = gguf_path(name)
        self.reader = GGUFReader(self.path)  # parsing a big GGUF takes seconds: do it once, share the reader
        self.ours = get_tokenizer(self.reader)
        self.dir = tmp / name
        write_tokenizer_from_gguf(self.reader, self.dir)
        self.converted = get_tokenizer(self.dir)
        self.ref = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        if name in ORIGINAL_PRE_TOKENIZERS:
            self.ref.backend_tokenizer.pre_tokenizer = ORIGINAL_PRE_TOKENIZERS[name]
        self.specials = list(self.ref.get_added_vocab())


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    return GGUFModel("SmolLM2-135M-Instruct", tmp_path_factory.mktemp("smol"))


@pytest.fixture(scope="session")
def qwen(tmp_path_factory):
    return GGUFModel("Qwen2.5-Coder-0.5B-Instruct", tmp_path_factory.mktemp("qwen"))


@pytest.fixture(params=["smol", "qwen"])
def real(request):
    return request.getfixturevalue(request.param)


def test_gguf_ids_match_transformers(real):
    assert_same_ids(real.ours, real.ref, TEXTS + fuzz(real.specials))
    for text in TEXTS:
        assert real.ours.decode(real.ours.encode(text)) == text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_matches_transformers(real, add_generation_prompt):
    for chat in CHATS:
        text = real.ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert real.ours.apply_chat_template(chat, add_generation_prompt) == text
        assert real.ours.encode_chat(chat, add_generation_prompt) == ref_chat_ids(real.ref, chat, add_generation_prompt)


def test_gguf_special_ids(real):
    ours, ref = real.ours, real.ref
    assert ours.bos_id() == ref.bos_token_id
    assert ours.eos_id() == ref.eos_token_id
    assert ours.add_bos == (ref.encode("a")[:1] == [ref.bos_token_id])  # transformers adds BOS only if wanted
    assert {ref.eos_token_id, ref.convert_tokens_to_ids("<|im_end|>")} <= ours.stop_ids()
    assert ours.stop_ids() <= {i for i, t in ref.added_tokens_decoder.items() if t.special}


def test_converted_folder_matches_gguf(real):
    conv, ours = real.converted, real.ours
    assert (conv.bos_id(), conv.eos_id(), conv.stop_ids(), conv.add_bos) == \
           (ours.bos_id(), ours.eos_id(), ours.stop_ids(), ours.add_bos)
    assert conv.chat_template == ours.chat_template
    for text in TEXTS + fuzz(real.specials, seed=1):
        assert conv.encode(text) == ours.encode(text), text
        assert conv.decode(conv.encode(text)) == ours.decode(ours.encode(text)), text
    for chat in CHATS:
        assert conv.encode_chat(chat) == ours.encode_chat(chat)


def test_converted_folder_loads_in_transformers(real):
    hf = AutoTokenizer.from_pretrained(real.dir)
    for text in TEXTS + fuzz(real.specials, n=50, seed=2):
        assert hf.encode(text, add_special_tokens=False) == real.ref.encode(text, add_special_tokens=False), text
    for chat in CHATS:
        assert ref_chat_ids(hf, chat) == ref_chat_ids(real.ref, chat)


def test_gguf_file_path_same_as_reader(smol):
    by_path = get_tokenizer(smol.path)
    for text in TEXTS:
        assert by_path.encode(text) == smol.ours.encode(text)
    assert by_path.stop_ids() == smol.ours.stop_ids() and by_path.chat_template == smol.ours.chat_template


def test_qwen2_gguf_normalizes_like_its_tokenizer_json(qwen):
    # Qwen2's own tokenizer.json applies NFC; transformers' GGUF loader leaves it out, so compare on the NFC text
    text = "Café naïve Ångström"
    assert qwen.ours.encode(unicodedata.normalize("NFD", text)) == qwen.ref.encode(text, add_special_tokens=False)


# ---- tiktoken rank files made from the Qwen2.5 vocab ----

def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return {chr(b) if b in printable else chr(next(shifted)): b for b in range(256)}


@pytest.fixture(scope="session")
def qwen_ranks(qwen) -> bytes:
    tokens = qwen.reader.fields["tokenizer.ggml.tokens"].contents()
    types = qwen.reader.fields["tokenizer.ggml.token_type"].contents()
    to_byte = byte_decoder()
    lines = [base64.b64encode(bytes(to_byte[c] for c in t)) + b" %d\n" % i
             for i, t in enumerate(tokens) if types[i] == 1]  # ordinary tokens come first, rank = id
    return b"".join(lines)


def test_qwen1_tiktoken_matches_qwen2_reference(qwen, qwen_ranks, tmp_path):
    (tmp_path / "qwen.tiktoken").write_bytes(qwen_ranks)
    tok = get_tokenizer(tmp_path)
    shared = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # same ids in Qwen 1 and Qwen2.5
    assert_same_ids(tok, qwen.ref, TEXTS + fuzz(shared))
    for chat in CHATS:  # no template: ChatML, which is what Qwen2.5's template renders when given a system prompt
        if chat[0]["role"] == "system":
            assert tok.encode_chat(chat) == ref_chat_ids(qwen.ref, chat)
    assert {qwen.ref.convert_tokens_to_ids(t) for t in shared[::2]} <= tok.stop_ids()
    assert tok.bos_id() is None and not tok.add_bos
    assert len(tok.encode("<|extra_0|><|extra_204|>")) == 2


# Llama 3.1's special tokens as its published tokenizer_config.json numbers them after the 128000 ranks
LLAMA31_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                 "<|eot_id|>", "<|python_tag|>"]


def test_llama3_tiktoken_matches_transformers_converter(qwen_ranks, tmp_path):
    base = qwen_ranks.count(b"\n")
    names = LLAMA31_NAMED + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA31_NAMED))]
    added = {str(base + i): {"content": name, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                             "single_word": False} for i, name in enumerate(names)}
    bare, configured = tmp_path / "bare", tmp_path / "configured"
    for folder in (bare, configured):
        folder.mkdir()
        (folder / "tokenizer.model").write_bytes(qwen_ranks)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "add_bos_token": True, "added_tokens_decoder": added}
    (configured / "tokenizer_config.json").write_text(json.dumps(config))
    ref = PreTrainedTokenizerFast.from_pretrained(configured)  # transformers converts the tiktoken file itself
    stops = {ref.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")}
    for tok in (get_tokenizer(bare), get_tokenizer(configured / "tokenizer.model")):
        assert_same_ids(tok, ref, TEXTS + fuzz(LLAMA31_NAMED))
        assert tok.bos_id() == ref.bos_token_id and tok.add_bos
        assert stops <= tok.stop_ids()
        ids = tok.encode_chat(CHATS[0])
        assert ids == ref_chat_ids(ref, CHATS[0], chat_template=LLAMA3_TEMPLATE)
        assert ids[0] == ref.bos_token_id and ids.count(ref.bos_token_id) == 1


# ---- sentencepiece ----

@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory):
    """A Llama-2-like SPM model (BPE, byte fallback, split digits, no normalization) trained on generated text."""
    folder = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sta", "pre", "ion", "ing", "ed", "er", "th", "qu", "x", "é", "ü"]
    words = ("the quick brown fox jumps over a lazy dog café naïve Straße def return print int 2024 12.5% "
             "I'm we'll they'd 日本語 🤗").split()
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) + rng.choice(["", ".", "\t", "  "])
             for _ in range(3000)]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=700, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    return folder


def test_sentencepiece_matches_transformers_llama(spm_dir):
    # what LlamaTokenizer.from_pretrained does with a tokenizer.model, without needing protobuf to read it
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    ref = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=True)
    # as in Llama-2's tokenizer.json: "▁" before every stretch of text, spaces as "▁", no pre-tokenizer
    ref.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    ref.backend_tokenizer.pre_tokenizer = None
    ours = get_tokenizer(spm_dir / "tokenizer.model")
    assert_same_ids(ours, ref, TEXTS + fuzz(["<s>", "</s>", "<unk>"]))
    for text in TEXTS:
        assert ours.decode(ours.encode(text)) == text
    assert (ours.bos_id(), ours.eos_id(), ours.add_bos) == (ref.bos_token_id, ref.eos_token_id, True)
    assert ours.stop_ids() == {ref.eos_token_id}
    for chat in CHATS:  # no template: Llama-2's [INST] format, with BOS written by the template
        assert ours.encode_chat(chat) == ref_chat_ids(ref, chat, chat_template=LLAMA2_TEMPLATE)


def write_spm_gguf(spm_model, path):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    n = sp.vocab_size()
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i)
             else 1 for i in range(n)]
    writer = GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_gguf_matches_sentencepiece(spm_dir, tmp_path):
    write_spm_gguf(spm_dir / "tokenizer.model", tmp_path / "spm.gguf")
    from_gguf, spm = get_tokenizer(tmp_path / "spm.gguf"), get_tokenizer(spm_dir / "tokenizer.model")
    write_tokenizer_from_gguf(tmp_path / "spm.gguf", tmp_path / "converted")
    converted = get_tokenizer(tmp_path / "converted")
    corpus = (spm_dir / "corpus.txt").read_text(encoding="utf-8")[:20000]
    for text in TEXTS + fuzz(["<s>", "</s>", "<unk>"], n=400) + [corpus]:
        ids = spm.encode(text)
        assert from_gguf.encode(text) == ids and converted.encode(text) == ids, text
        assert from_gguf.decode(ids) == converted.decode(ids) == spm.decode(ids), text
    for tok in (from_gguf, converted):
        assert (tok.bos_id(), tok.eos_id(), tok.add_bos, tok.stop_ids()) == \
               (spm.bos_id(), spm.eos_id(), True, spm.stop_ids())
        assert tok.encode_chat(CHATS[0]) == spm.encode_chat(CHATS[0])


# ---- chat rendering, side files, errors ----

TRICKY_TEMPLATE = """{%- for m in messages %}
    {%- if m['role'] == 'stop' %}{% break %}{% endif %}
  {{ m['role'] }}: {{ m['content'] | tojson }}
{% endfor %}
{{- bos_token }}|{{ eos_token }}
{% if add_generation_prompt %}  >>{% endif %}"""


@pytest.mark.parametrize("template", [TRICKY_TEMPLATE, CHATML_TEMPLATE, LLAMA3_TEMPLATE, LLAMA2_TEMPLATE])
def test_rendering_matches_transformers(smol, template):
    chats = CHATS + [[{"role": "user", "content": "<b> & 'q' é 🤗"}, {"role": "stop", "content": "x"}]]
    for chat in chats[:-1] if template == LLAMA2_TEMPLATE else chats:
        for add_generation_prompt in (True, False):
            expected = smol.ref.apply_chat_template(chat, chat_template=template, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt)
            assert render_chat(template, chat, add_generation_prompt, smol.ref.bos_token,
                               smol.ref.eos_token) == expected


def test_fallback_formats_are_the_documented_ones():
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert render_chat(LLAMA2_TEMPLATE, chat, True, "<s>", "</s>") == \
        "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST]"
    assert render_chat(LLAMA3_TEMPLATE, chat[1:2], True, "<|begin_of_text|>", "<|eot_id|>") == \
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render_chat(CHATML_TEMPLATE, chat[:2], True, None, None) == \
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n"


def test_side_files(smol, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(smol.dir, folder)
    extra_stop = smol.ref.convert_tokens_to_ids("<jupyter_output>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [smol.ref.eos_token_id, extra_stop]}))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}]{% endfor %}")
    (folder / "tokenizer.model").write_bytes(b"not read: tokenizer.json wins")
    tok = get_tokenizer(folder)
    assert extra_stop in tok.stop_ids() and smol.ours.stop_ids() <= tok.stop_ids()
    assert tok.apply_chat_template(CHATS[0]) == "[system][user][assistant][user]"


def error_line(path) -> str:
    with pytest.raises(ValueError) as e:
        get_tokenizer(path)
    assert isinstance(e.value, TokenizerError) and "\n" not in str(e.value)
    return str(e.value)


def write_gguf(path, **strings):
    writer = GGUFWriter(path, arch="llama")
    for key, value in strings.items():
        writer.add_string(key.replace("_", "."), value)
    if strings:
        writer.add_token_list(["a", "b", "ab"])
        writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_bad_inputs_give_one_line_errors(tmp_path, spm_dir):
    assert "does not exist" in error_line(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "no tokenizer.json" in error_line(tmp_path / "empty")
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert "cannot read" in error_line(tmp_path / "tokenizer.json")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "tokenizer.model").write_bytes(bytes(range(256)) * 4)
    assert "cannot read" in error_line(tmp_path / "garbage")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    assert "unknown tokenizer file" in error_line(tmp_path / "weights.bin")
    (tmp_path / "text.gguf").write_text("hello")
    assert "cannot read" in error_line(tmp_path / "text.gguf")
    write_gguf(tmp_path / "bare.gguf")
    assert "no tokenizer metadata" in error_line(tmp_path / "bare.gguf")
    write_gguf(tmp_path / "pre.gguf", tokenizer_ggml_model="gpt2", tokenizer_ggml_pre="made-up")
    assert "'made-up' is not supported" in error_line(tmp_path / "pre.gguf")
    write_gguf(tmp_path / "bert.gguf", tokenizer_ggml_model="bert")
    assert "'bert' is not supported" in error_line(tmp_path / "bert.gguf")
    (tmp_path / "badconfig").mkdir()
    shutil.copy(spm_dir / "tokenizer.model", tmp_path / "badconfig")
    (tmp_path / "badconfig" / "tokenizer_config.json").write_text("{oops")
    assert "tokenizer_config.json" in error_line(tmp_path / "badconfig")
    tok = get_tokenizer(spm_dir)
    with pytest.raises(TokenizerError, match="only have system, user and assistant") as e:
        tok.encode_chat([{"role": "tool", "content": "x"}])
    assert "\n" not in str(e.value)
