#!/usr/bin/env python3
"""Golden data for apprentice-model's tokenizer and chat-template tests, made with Python's HF
stack (`tokenizers`, `transformers`, `jinja2`), independently of the Rust code under test.

    python3 -m venv /tmp/golden-venv
    /tmp/golden-venv/bin/pip install "transformers>=4.57,<5" tokenizers gguf jinja2 regex
    /tmp/golden-venv/bin/python make_golden.py /path/to/SmolLM2-135M-Instruct.Q4_1.gguf

(`apprentice model fetch smollm2-135m` puts the GGUF in ~/.cache/apprentice/models/smollm2-135m/.)
Writes tokenizer_ids.json and chat_templates.json beside this script.

Tokenizer ids. transformers' own GGUF loader (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`)
needs torch and, for a llama-architecture GGUF with a gpt2 vocabulary, builds a ByteLevel
pre-tokenizer without SmolLM2's digit splitting, so it does not reproduce SmolLM2's published
tokenizer.json. Instead, two implementations are built from the GGUF's vocabulary and merges
(read with the `gguf` package) and must agree on every string:
  1. HF `tokenizers` (Python) with the components of the models' published tokenizer.json files:
     SmolLM2 = Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)] and a
     ByteLevel decoder; Qwen2 = NFC + Split(regex) + ByteLevel(use_regex=False); Llama 3 = Split(regex)
     + ByteLevel(use_regex=False) with ignore_merges; the 17 control tokens as special added tokens.
  2. A from-scratch byte-level BPE in this file (the `regex` module for the split patterns, the
     GPT-2 byte-to-unicode table, lowest-rank-first merges), sharing no code with 1.
It also checks the reference ids of SmolLM2's HF tokenizer ("a 12 héllo 🤖 <|im_start|>").

Chat templates. Each conversation is rendered by transformers' `apply_chat_template`
(jinja2 with trim_blocks, lstrip_blocks, loopcontrols, its tojson, raise_exception) with the GGUF's
own template (SmolLM2) and with templates/tools.jinja (a tool-calling template written for these
tests), with bos/eos/unk/pad tokens from the GGUF.
"""

import copy
import json
import os
import sys
import unicodedata

import regex
from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers import Regex as TRegex
from tokenizers.models import BPE

HERE = os.path.dirname(os.path.abspath(__file__))

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

STRINGS = [
    "",
    " ",
    "  ",
    "\t",
    "\n",
    "hello",
    " hello",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple   inner    spaces",
    "tabs\tand\nnewlines\n\nand\r\nwindows\r\n",
    "   \n  \n\t\t",
    "12345",
    "3.14",
    "1,000,000.50 and 007",
    "v1.2.3-rc4 x=1+2*3",
    "00000000000000000000",
    "héllo wörld, naïve café",
    "e\u0301 (combining accent) vs \u00e9",
    "ﬁ ligature, Ångström, Straße",
    "Ελληνικά και русский текст",
    "日本語のテキストと中文测试",
    "한국어 문장",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "emoji 🤖 robot",
    "family 👨‍👩‍👧‍👦 ZWJ",
    "flag 🏳️‍🌈 and thumbs 👍🏽",
    "a 12 héllo 🤖 <|im_start|>",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more<|endoftext|>",
    "<|im_start",
    "<|im_start|><|im_start|>",
    "don't they'll I'm we've you'd",
    "DON'T THEY'LL",
    'fn main() {\n    println!("{}", x + 1);\n}\n',
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2\n    return None  # comment\n",
    '{"key": [1, 2.5, null], "nested": {"a": "b"}}',
    "https://example.com/path?q=1&r=two#frag",
    "non\u00a0breaking and zero\u200bwidth",
    "∑∫√∞ ≤ ≥ ≠",
    "<tool_call>\n{\"name\": \"go\", \"arguments\": {\"dir\": \"left\"}}\n</tool_call>",
]

REFERENCE = ("a 12 héllo 🤖 <|im_start|>", [81, 216, 33, 34, 294, 2756, 31394, 15107, 114, 240, 216, 1])


def read_gguf(path):
    reader = GGUFReader(path)
    f = reader.fields
    out = {
        "tokens": list(f["tokenizer.ggml.tokens"].contents()),
        "merges": list(f["tokenizer.ggml.merges"].contents()),
        "token_type": list(f["tokenizer.ggml.token_type"].contents()),
        "pre": f["tokenizer.ggml.pre"].contents(),
        "chat_template": f["tokenizer.chat_template"].contents(),
    }
    for key in ["bos", "eos", "unknown", "padding"]:
        field = f.get(f"tokenizer.ggml.{key}_token_id")
        out[key] = int(field.contents()) if field is not None else None
    return out


# 1. HF tokenizers (Python), components as in the models' tokenizer.json files.
def hf_tokenizer(g, kind):
    vocab = {t: i for i, t in enumerate(g["tokens"])}
    merges = [tuple(m.split(" ")) for m in g["merges"]]
    tok = Tokenizer(BPE(vocab, merges, ignore_merges=(kind == "llama-bpe")))
    if kind == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    elif kind in ("qwen2", "llama-bpe"):
        pattern = QWEN2_PATTERN if kind == "qwen2" else LLAMA3_PATTERN
        if kind == "qwen2":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(TRegex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ValueError(kind)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(g["tokens"], g["token_type"]) if ty == 3]
    )
    return tok


# 2. A from-scratch byte-level BPE.
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ScratchBPE:
    def __init__(self, g, kind):
        self.vocab = {t: i for i, t in enumerate(g["tokens"])}
        self.ranks = {tuple(m.split(" ")): i for i, m in enumerate(g["merges"])}
        self.specials = sorted((t for t, ty in zip(g["tokens"], g["token_type"]) if ty == 3), key=len, reverse=True)
        self.byte_map = bytes_to_unicode()
        self.kind = kind
        self.pattern = regex.compile({"smollm": GPT2_PATTERN, "qwen2": QWEN2_PATTERN, "llama-bpe": LLAMA3_PATTERN}[kind])

    def split_specials(self, text):
        parts, i, start = [], 0, 0
        while i < len(text):
            for s in self.specials:
                if text.startswith(s, i):
                    if start < i:
                        parts.append((False, text[start:i]))
                    parts.append((True, s))
                    i += len(s)
                    start = i
                    break
            else:
                i += 1
        if start < len(text):
            parts.append((False, text[start:]))
        return parts

    def words(self, text):
        if self.kind == "qwen2":
            text = unicodedata.normalize("NFC", text)
        if self.kind == "smollm":
            # Digits(individual_digits=True): every digit is its own piece, then the GPT-2 regex.
            pieces = [p for p in regex.split(r"(\p{N})", text) if p]
        else:
            pieces = [text]
        for piece in pieces:
            yield from self.pattern.findall(piece)

    def bpe(self, word):
        if self.kind == "llama-bpe" and word in self.vocab:
            return [word]
        parts = list(word)
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda j: self.ranks.get((parts[j], parts[j + 1]), float("inf")))
            if (parts[best], parts[best + 1]) not in self.ranks:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        return parts

    def encode(self, text):
        ids = []
        for special, part in self.split_specials(text):
            if special:
                ids.append(self.vocab[part])
                continue
            for word in self.words(part):
                mapped = "".join(self.byte_map[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab[p] for p in self.bpe(mapped))
        return ids


def tokenizer_golden(g):
    out = {"pre_tokenizers": {}}
    for kind in ["smollm", "qwen2", "llama-bpe"]:
        hf = hf_tokenizer(g, kind)
        scratch = ScratchBPE(g, kind)
        cases = []
        for s in STRINGS:
            a = hf.encode(s, add_special_tokens=False).ids
            b = scratch.encode(s)
            if a != b:
                raise SystemExit(f"{kind}: implementations disagree on {s!r}:\n  tokenizers {a}\n  scratch    {b}")
            if kind == "smollm" and hf.decode(a, skip_special_tokens=False) != s:
                raise SystemExit(f"{kind}: decode(encode({s!r})) != input")
            cases.append({"text": s, "ids": a})
        out["pre_tokenizers"][kind] = cases
    smollm = hf_tokenizer(g, "smollm")
    got = smollm.encode(REFERENCE[0], add_special_tokens=False).ids
    if got != REFERENCE[1]:
        raise SystemExit(f"reference ids differ: {got} != {REFERENCE[1]}")
    out["reference"] = {"text": REFERENCE[0], "ids": REFERENCE[1]}
    return out


# Chat templates.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo actuelle d'une ville — \"quoted\" & <b>tags</b> \\ backslash",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 16},
                "threshold": {"type": "number", "default": 0.5, "examples": [1e-05, 2.0, 1e16, -3.25]},
                "verbose": {"type": "boolean", "default": False, "nullable": None},
            },
            "required": ["city", "unit"],
        },
    },
}
MOVE_TOOL = {
    "type": "function",
    "function": {
        "name": "move",
        "description": "Move the agent 🤖 one cell.",
        "parameters": {"type": "object", "properties": {"direction": {"type": "string"}}, "required": ["direction"]},
    },
}
NOFN_TOOL = {"type": "retrieval", "name": "no function key"}

CONVERSATIONS = [
    ("user_only_default_system", [{"role": "user", "content": "What is 2+2?"}], None, True),
    ("user_only_no_generation_prompt", [{"role": "user", "content": "What is 2+2?"}], None, False),
    (
        "system_user_assistant",
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ],
        None,
        False,
    ),
    (
        "multi_turn_unicode",
        [
            {"role": "user", "content": "  Bonjour! Ça va? 🤖\n\nDeux lignes."},
            {"role": "assistant", "content": "Très bien, merci 👍🏽.\n"},
            {"role": "user", "content": "日本語で 12345 と 3.14"},
            {"role": "assistant", "content": " leading space and {{ braces }} {% not a tag %}"},
            {"role": "user", "content": "\tTabbed <|im_end|> literal"},
        ],
        None,
        True,
    ),
    (
        "empty_contents",
        [{"role": "system", "content": ""}, {"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
        None,
        False,
    ),
    (
        "tools_calls_and_responses",
        [
            {"role": "system", "content": "  You plan trips.  "},
            {"role": "user", "content": "Weather in Zürich and Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"unit": "celsius", "city": "Zürich"}},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 2}},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 3.5}"},
            {"role": "tool", "tool_call_id": "call_2", "content": "{\"temp\": 9}"},
            {"role": "assistant", "content": "  Zürich 3.5 °C, Paris 9 °C.  "},
            {"role": "user", "content": [{"type": "text", "text": "Thanks! "}, {"type": "image_url", "image_url": "x"}, {"type": "text", "text": "Now move."}]},
        ],
        [WEATHER_TOOL, MOVE_TOOL, NOFN_TOOL],
        True,
    ),
    (
        "tools_string_arguments",
        [
            {"role": "user", "content": "go left"},
            {
                "role": "assistant",
                "content": "Moving.",
                "tool_calls": [{"type": "function", "function": {"name": "move", "arguments": "{\"direction\": \"left\"}"}}],
            },
            {"role": "tool", "content": "ok"},
        ],
        [MOVE_TOOL],
        False,
    ),
]


def template_golden(g):
    from transformers import PreTrainedTokenizerFast

    tokens = g["tokens"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizer(g, "smollm"),
        bos_token=tokens[g["bos"]],
        eos_token=tokens[g["eos"]],
        unk_token=tokens[g["unknown"]],
        pad_token=tokens[g["padding"]],
    )
    with open(os.path.join(HERE, "templates", "tools.jinja"), encoding="utf-8") as f:
        tools_template = f.read()
    templates = {"smollm2": g["chat_template"], "tools": tools_template}
    cases = []
    for template_name, template in templates.items():
        for name, messages, tools, agp in CONVERSATIONS:
            if template_name == "smollm2" and (tools or any(not isinstance(m.get("content"), str) for m in messages)):
                continue  # SmolLM2's template concatenates content strings and knows no tools.
            text = tok.apply_chat_template(
                copy.deepcopy(messages),
                tools=copy.deepcopy(tools),
                add_generation_prompt=agp,
                tokenize=False,
                chat_template=template,
            )
            cases.append(
                {
                    "template": template_name,
                    "name": name,
                    "messages": messages,
                    "tools": tools,
                    "add_generation_prompt": agp,
                    "text": text,
                }
            )
    return {
        "special_tokens": {
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "unk_token": tok.unk_token,
            "pad_token": tok.pad_token,
        },
        "cases": cases,
    }


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    g = read_gguf(sys.argv[1])
    with open(os.path.join(HERE, "tokenizer_ids.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_golden(g), f, ensure_ascii=False, indent=1)
        f.write("\n")
    with open(os.path.join(HERE, "chat_templates.json"), "w", encoding="utf-8") as f:
        json.dump(template_golden(g), f, ensure_ascii=False, indent=1)
        f.write("\n")
    print("wrote tokenizer_ids.json and chat_templates.json")


if __name__ == "__main__":
    main()
