"""Text <-> token ids for every checkpoint format this project reads, behind one small interface.

get_tokenizer(path) picks a backend: HF `tokenizers` (tokenizer.json, GGUF metadata), `sentencepiece`
(Llama-2 style tokenizer.model) or `tiktoken` (Llama-3 tokenizer.model, Qwen-1 qwen.tiktoken). Every backend
encodes without BOS, turns special-token strings found in the text into their single id, drops special
tokens when decoding, and renders chats with the checkpoint's own Jinja template.
"""
import base64
import json
import re
import unicodedata
from datetime import datetime
from pathlib import Path

import jinja2
import sentencepiece
import tiktoken
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TokenizerError(ValueError):
    """A problem the user can fix (missing, unreadable or unsupported tokenizer files); message is one line."""


# Tokens that end an assistant turn in the chat formats we know; whichever of them a vocab has are stop ids.
END_OF_TURN = ["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "</s>"]

# Pre-tokenizer regexes (split text into words before BPE), written from the models' published behaviour;
# GPT-2's own regex is built into the `tokenizers` ByteLevel pre-tokenizer.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen splits numbers into single digits

# tiktoken files carry no special tokens: they follow the ranks, in this order, as the reference code does.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIALS) + 2)]
QWEN1_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]

# Chat formats for checkpoints that ship no template.
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA2_TEMPLATE = (
    "{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% for m in (messages[1:] if system else messages) %}"
    "{% if m['role'] == 'user' %}{% set text = m['content'] | trim %}"
    "{% if loop.first and system %}"
    "{% set text = '<<SYS>>\\n' + system | trim + '\\n<</SYS>>\\n\\n' + text %}{% endif %}"
    "{{ bos_token + '[INST] ' + text + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}"
    "{% else %}{{ raise_exception('Llama-2 chats only have system, user and assistant messages') }}{% endif %}"
    "{% endfor %}")


def default_chat_template(special: dict[str, int]) -> str:
    if "<|im_start|>" in special:
        return CHATML_TEMPLATE
    if "<|start_header_id|>" in special:
        return LLAMA3_TEMPLATE
    return LLAMA2_TEMPLATE


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool, bos_token, eos_token) -> str:
    """Render like transformers' apply_chat_template: sandboxed Jinja, trim/lstrip blocks, its helpers."""
    def raise_exception(message):
        raise TokenizerError(f"chat template refused the messages: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, > and & for HTML, which would change the prompt text
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token or "", eos_token=eos_token or "")
    except jinja2.TemplateError as e:
        raise TokenizerError(f"cannot render the chat template: {e}; check the messages or the template") from None


class Tokenizer:
    """What every backend shares. A backend sets up its library, then calls this __init__ with `special`
    (token text matched whole in the input -> id), and implements encode_text, decode and piece_id."""

    def __init__(self, special: dict[str, int], config: dict, bos=None, eos=None, add_bos=False):
        self.special = special
        self.special_ids = set(special.values())
        longest_first = sorted(special, key=len, reverse=True)
        self.special_re = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if special else None
        self.bos_token = config.get("bos_token", bos)
        self.eos_token = config.get("eos_token", eos)
        self.chat_template = config.get("chat_template") or default_chat_template(special)
        self._bos = self.token_id(self.bos_token)
        self._eos = self.token_id(self.eos_token)
        if self._eos is None:
            raise TokenizerError(f"tokenizer has no EOS token ({self.eos_token!r} not in its vocab); "
                                 "put the right eos_token in tokenizer_config.json")
        self.add_bos = bool(config.get("add_bos_token", add_bos)) and self._bos is not None
        ends = {special[t] for t in END_OF_TURN if t in special}
        self._stop = {self._eos, *ends, *config.get("eos_token_ids", [])}

    def token_id(self, text) -> int | None:
        return None if text is None else self.special.get(text, self.piece_id(text))

    def bos_id(self) -> int | None:
        return self._bos

    def eos_id(self) -> int:
        return self._eos

    def stop_ids(self) -> set[int]:
        return set(self._stop)

    def encode(self, text: str) -> list[int]:
        """Ids for text, no BOS added; special-token strings in the text become their single id."""
        parts = self.special_re.split(text) if self.special_re else [text]
        ids = []
        for i, part in enumerate(parts):  # odd positions hold the special tokens the regex matched
            if i % 2:
                ids.append(self.special[part])
            elif part:
                ids.extend(self.encode_text(part))
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self.chat_template, messages, add_generation_prompt, self.bos_token, self.eos_token)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for a chat. Templates write BOS themselves where the model wants one, so none is added."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


class SentencePieceTokenizer(Tokenizer):
    """Llama-2 style tokenizer.model; each stretch between special tokens gets its own leading space,
    as HF's legacy Llama tokenizer does."""

    def __init__(self, path: Path, config: dict):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.n_pieces = self.sp.vocab_size()
        special = {self.sp.id_to_piece(i): i for i in range(self.n_pieces)
                   if self.sp.is_control(i) or self.sp.is_unknown(i)}
        special.update(config.get("added_tokens", {}))
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        super().__init__(special, config, bos=self.sp.id_to_piece(bos) if bos >= 0 else None,
                         eos=self.sp.id_to_piece(eos) if eos >= 0 else None, add_bos=True)

    def encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i < self.n_pieces and i not in self.special_ids])

    def piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Llama-3 tokenizer.model or Qwen-1 qwen.tiktoken: byte-level BPE ranks, special tokens appended after them."""

    def __init__(self, path: Path, config: dict):
        ranks = read_tiktoken_ranks(path)
        self.qwen = path.suffix == ".tiktoken"
        names = QWEN1_SPECIALS if self.qwen else LLAMA3_SPECIALS
        special = {name: len(ranks) + i for i, name in enumerate(names)}
        special.update(config.get("added_tokens", {}))
        pattern = QWEN_PATTERN if self.qwen else LLAMA3_PATTERN
        self.enc = tiktoken.Encoding(path.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self.ranks = ranks
        bos, eos = (None, "<|endoftext|>") if self.qwen else ("<|begin_of_text|>", "<|end_of_text|>")
        super().__init__(special, config, bos=bos, eos=eos, add_bos=not self.qwen)

    def encode_text(self, text: str) -> list[int]:
        if self.qwen:  # Qwen-1's tokenizer NFC-normalises its input
            text = unicodedata.normalize("NFC", text)
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([i for i in ids if i < len(self.ranks) and i not in self.special_ids])

    def piece_id(self, piece: str) -> int | None:
        return self.ranks.get(piece.encode())


def first_present(names, special: dict[str, int]) -> str | None:
    return next((name for name in names if name in special), None)


class HFTokenizer(Tokenizer):
    """An HF `tokenizers` object (from tokenizer.json or rebuilt from GGUF); it matches added tokens itself."""

    def __init__(self, tok: tokenizers.Tokenizer, config: dict):
        self.tok = tok
        special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        # Without a config, the post-processor tells whether (and which) BOS the model expects.
        probe, plain = tok.encode("a").ids, tok.encode("a", add_special_tokens=False).ids
        adds_bos = probe[:1] != plain[:1]
        bos = tok.id_to_token(probe[0]) if adds_bos else first_present(("<s>", "<|begin_of_text|>", "<bos>"), special)
        eos = first_present(("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>"), special)
        super().__init__(special, config, bos=bos, eos=eos, add_bos=adds_bos)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def piece_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


# ---- GGUF: rebuild an HF tokenizer.json from the metadata llama.cpp stores ----

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # tokenizer.ggml.token_type values

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def split_then_bytes(pattern: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        dict(BYTE_LEVEL, use_regex=False)]}


DIGITS_THEN_BYTES = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}

# tokenizer.ggml.pre -> (pre_tokenizer, normalizer) of the original model's tokenizer.json
GGUF_PRE_TOKENIZERS = {
    "default": (BYTE_LEVEL, None),
    "gpt-2": (BYTE_LEVEL, None),
    "llama-bpe": (split_then_bytes(LLAMA3_PATTERN), None),
    "llama3": (split_then_bytes(LLAMA3_PATTERN), None),
    "qwen2": (split_then_bytes(QWEN_PATTERN), {"type": "NFC"}),
    "smollm": (DIGITS_THEN_BYTES, None),
    "starcoder": (DIGITS_THEN_BYTES, None),
}


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """SentencePiece BPE merges the adjacent pair whose joined piece scores highest; as ranked merges
    that is every split of a normal piece into two normal pieces, ordered by the joined piece's score."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    merges = []
    for piece, i in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], vocab[left], vocab[right], left, right))
    return [[left, right] for *_, left, right in sorted(merges)]


def gguf_tokenizer(gguf_path) -> tuple[dict, dict]:
    """(tokenizer.json as a dict, tokenizer config) from a GGUF file's metadata. Accepts an open GGUFReader
    too, since opening a large GGUF takes seconds."""
    from gguf import GGUFReader  # only GGUF tokenizers need the gguf package
    reader = gguf_path if isinstance(gguf_path, GGUFReader) else GGUFReader(gguf_path)

    def get(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    kind, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre", "default")
    tokens = get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(f"{reader.data.filename} has no tokenizer metadata; use a GGUF that includes one")
    types = get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    # control and unknown tokens are special (dropped when decoding); user-defined ones are matched whole but kept
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] != USER_DEFINED}
             for i, t in enumerate(tokens) if types[i] in (UNKNOWN, CONTROL, USER_DEFINED)]
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        if pre not in GGUF_PRE_TOKENIZERS:
            raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported (known: "
                                 f"{', '.join(GGUF_PRE_TOKENIZERS)}); add its regex to GGUF_PRE_TOKENIZERS")
        pre_tokenizer, normalizer = GGUF_PRE_TOKENIZERS[pre]
        merges = [m.split(" ", 1) for m in get("tokenizer.ggml.merges", [])]
        model = {"type": "BPE", "vocab": vocab, "merges": merges, "byte_fallback": False, "fuse_unk": False,
                 "ignore_merges": pre in ("llama-bpe", "llama3")}  # Llama-3 takes whole words found in the vocab as is
        decoder = dict(BYTE_LEVEL, add_prefix_space=True)
    elif kind == "llama":
        # like Llama-2's tokenizer.json: a "▁" before every stretch of text (as sentencepiece's dummy prefix does)
        prefix = bool(get("tokenizer.ggml.add_space_prefix", True))
        normalizer = {"type": "Sequence", "normalizers": ([{"type": "Prepend", "prepend": "▁"}] if prefix else []) +
                      [{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        pre_tokenizer = None
        unk = get("tokenizer.ggml.unknown_token_id")
        merges = spm_merges(tokens, get("tokenizer.ggml.scores", [0.0] * len(tokens)), types)
        model = {"type": "BPE", "vocab": vocab, "merges": merges, "byte_fallback": True, "fuse_unk": True,
                 "unk_token": tokens[unk] if unk is not None else None}
        decoder = {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                    {"type": "ByteFallback"}, {"type": "Fuse"}] +
                   ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])}
    else:
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' and 'llama'); "
                             "use the original checkpoint's tokenizer files")

    bos_id, eos_id = get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")
    config = {"bos_token": tokens[bos_id] if bos_id is not None else None,
              "eos_token": tokens[eos_id] if eos_id is not None else None,
              "add_bos_token": bool(get("tokenizer.ggml.add_bos_token", kind == "llama")),
              "chat_template": get("tokenizer.chat_template")}
    post = None
    if config["add_bos_token"] and config["bos_token"]:  # so plain `tokenizers` users get the BOS too
        bos = config["bos_token"]
        post = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    tokenizer_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                      "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post,
                      "decoder": decoder, "model": model}
    return tokenizer_json, config


def tokenizer_from_gguf(gguf_path) -> HFTokenizer:
    tokenizer_json, config = gguf_tokenizer(gguf_path)
    return HFTokenizer(tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json)), config)


def write_tokenizer_from_gguf(gguf_path, out_dir) -> None:
    """Write tokenizer.json and tokenizer_config.json rebuilt from a GGUF file into out_dir."""
    tokenizer_json, config = gguf_tokenizer(gguf_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    decoder = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tokenizer_json["added_tokens"]}
    hf_config = {"tokenizer_class": "PreTrainedTokenizerFast", **config, "added_tokens_decoder": decoder}
    (out / "tokenizer_config.json").write_text(json.dumps(hf_config, indent=2, ensure_ascii=False), encoding="utf-8")


# ---- finding and reading the files ----

def read_config(folder: Path) -> dict:
    """bos/eos tokens, add_bos_token, chat template, added tokens and extra stop ids from the HF side files."""
    def load(name):
        file = folder / name
        try:
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot read {file}: {e}; fix or delete the file") from None

    def text(token):
        return token.get("content") if isinstance(token, dict) else token

    config = {}
    for source in (load("special_tokens_map.json"), load("tokenizer_config.json")):
        config.update({k: text(source[k]) for k in ("bos_token", "eos_token") if k in source})
        config.update({k: source[k] for k in ("add_bos_token", "chat_template") if k in source})
        decoder = source.get("added_tokens_decoder", {})
        config.setdefault("added_tokens", {}).update({text(t): int(i) for i, t in decoder.items()})
    if isinstance(config.get("chat_template"), list):  # named templates: take the default one
        named = {t["name"]: t["template"] for t in config["chat_template"]}
        config["chat_template"] = named.get("default", next(iter(named.values()), None))
    if (folder / "chat_template.jinja").is_file():  # newer transformers save the template on its own
        config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    eos = load("generation_config.json").get("eos_token_id")
    config["eos_token_ids"] = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return config


def is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline(1000).strip()
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", first) is not None


def get_tokenizer(path) -> Tokenizer:
    """Tokenizer for a checkpoint directory, or a tokenizer.json / tokenizer.model / *.tiktoken / *.gguf file
    (or an open GGUFReader, so a caller that reads the weights too parses a big GGUF once)."""
    if type(path).__name__ == "GGUFReader":  # not isinstance: that would import gguf for every tokenizer
        return tokenizer_from_gguf(path)
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer path {path} does not exist; pass a checkpoint directory or a tokenizer file")
    if path.is_dir():
        found = [path / n for n in ("tokenizer.json", "tokenizer.model", "qwen.tiktoken") if (path / n).is_file()]
        if not found:
            raise TokenizerError(f"no tokenizer.json, tokenizer.model or qwen.tiktoken in {path}; "
                                 "copy the tokenizer files from the original checkpoint into it")
        path = found[0]
    try:
        if path.suffix == ".gguf":
            return tokenizer_from_gguf(path)
        config = read_config(path.parent)
        if path.suffix == ".json":
            return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), config)
        if path.suffix == ".tiktoken" or (path.suffix == ".model" and is_tiktoken_file(path)):
            return TiktokenTokenizer(path, config)
        if path.suffix == ".model":
            return SentencePieceTokenizer(path, config)
    except TokenizerError:
        raise
    except Exception as e:  # the libraries raise assorted types for corrupt files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"cannot read tokenizer file {path} ({reason}); re-download or re-convert it") from None
    raise TokenizerError(f"unknown tokenizer file {path}; pass tokenizer.json, tokenizer.model, *.tiktoken or *.gguf")
