"""Hugging Face tokenizers: `tokenizer.json` through the `tokenizers` library, and the files beside it
(tokenizer_config.json, special_tokens_map.json, chat_template.jinja) read the way transformers 5's
AutoTokenizer reads them, so that a prompt gets exactly the ids transformers would feed the model.

What transformers 5 does, and this module with it (checked against transformers 5.24):
- BOS/EOS around a prompt come from tokenizer.json's post-processor alone. tokenizer_config.json's
  add_bos_token/add_eos_token are dropped when a tokenizer.json is present (they decide only for a bare
  tokenizer.model; bigmodel_cli/data/tokenizer.py applies them there, default: neither).
- Special tokens the config names (bos/eos/unk/pad..., additional_special_tokens, added_tokens_decoder) that
  tokenizer.json does not list as added tokens are added to it, matched whole in text.
- `split_special_tokens` true reads special-token strings in text as plain text.
- Encoding never truncates or pads, whatever tokenizer.json says: `tokenizer(text)` does neither.
- decode(ids) is `decode(ids, skip_special_tokens=True)`, with clean_up_tokenization_spaces applied only to
  non-BPE models (transformers skips it for BPE, where it would remove real spaces).
Not reproduced: the few tokenizer classes that rebuild their pipeline from the vocabulary instead of using
tokenizer.json's (LlamaTokenizer, GPT2Tokenizer, Qwen2Tokenizer...): they are meant to be equivalent to it.
"""

from __future__ import annotations

from pathlib import Path

import tokenizers

from bigmodel_cli import storage
from bigmodel_cli.errors import UserError
from bigmodel_cli.rundir import CHAT_TEMPLATE_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE

PROBE = "a"  # encoded with and without the post-processor to see what it adds around a text


def read_config(directory: Path) -> dict:
    """A model directory's tokenizer_config.json as transformers reads it ({} without one).

    special_tokens_map.json's tokens override the config's when the config has no added_tokens_decoder (the
    legacy layout), and chat_template.jinja, which transformers 5 writes, wins over the config's template."""
    directory = storage.path(directory)
    config = storage.read_json_object(directory / TOKENIZER_CONFIG_FILE) or {}
    if "added_tokens_decoder" not in config:
        config.update(storage.read_json_object(directory / SPECIAL_TOKENS_MAP_FILE) or {})
    template = directory / CHAT_TEMPLATE_FILE
    if template.is_file():
        config["chat_template"] = template.read_text(encoding="utf-8")
    return config


def token_text(value) -> str | None:
    """The text of a special token as a config gives it: a string, or an AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_template(value) -> str | None:
    """The default chat template of a config's chat_template: a string, or a list of named templates."""
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization: spaces before punctuation and English contractions removed."""
    for spaced in (" .", " ?", " !", " ,", " n't", " 'm", " 's", " 've", " 're"):
        text = text.replace(spaced, spaced[1:])
    return text.replace(" ' ", "'")


def _added_token(value, special: bool) -> tokenizers.AddedToken | None:
    """An AddedToken from a config entry (a string, or a dict with its matching flags)."""
    text = token_text(value)
    if not text:
        return None
    flags = value if isinstance(value, dict) else {}
    return tokenizers.AddedToken(
        text,
        single_word=bool(flags.get("single_word", False)),
        lstrip=bool(flags.get("lstrip", False)),
        rstrip=bool(flags.get("rstrip", False)),
        normalized=bool(flags.get("normalized", not special)),
        special=bool(flags.get("special", special)),
    )


class HFTokenizer:
    """A tokenizer.json with its tokenizer_config.json, behind the interface every bigmodel tokenizer has."""

    def __init__(self, json_file: Path | str, config: dict):
        json_file = storage.path(json_file)
        if not json_file.is_file():
            raise UserError(f"tokenizer {json_file} not found: pass a tokenizer.json file or a model directory")
        try:
            self.tk = tokenizers.Tokenizer.from_str(json_file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(
                f"{json_file} is not a tokenizer.json (not UTF-8 text): restore the model's own file"
            ) from None
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception for bad files
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{json_file} is not a tokenizer.json the tokenizers library reads ({reason})") from None
        self.path = json_file
        self.tk.no_truncation()
        self.tk.no_padding()
        self._add_named_tokens(config)
        self.tk.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self.vocab_size = max(self.tk.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        # What the post-processor adds around a text: BOS in front (Llama 3, SmolLM2...), nothing (Qwen).
        with_specials = self.tk.encode(PROBE, add_special_tokens=True).ids
        plain = self.tk.encode(PROBE, add_special_tokens=False).ids
        at = next((i for i in range(len(with_specials) + 1) if with_specials[i : i + len(plain)] == plain), 0)
        before, after = with_specials[:at], with_specials[at + len(plain) :]
        self.add_bos, self.add_eos = bool(before), bool(after)
        self.bos_id = self._named_id(config, "bos_token", before[-1] if before else -1)
        self.eos_id = self._named_id(config, "eos_token", after[0] if after else -1)
        self.pad_id = self._named_id(config, "pad_token", -1)
        self.chat_template = chat_template(config.get("chat_template"))
        bpe = isinstance(self.tk.model, tokenizers.models.BPE)
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and not bpe

    def _add_named_tokens(self, config: dict) -> None:
        """Add the config's special and added tokens that tokenizer.json lacks, as transformers does on load."""
        known = {t.content for t in self.tk.get_added_tokens_decoder().values()}
        named = [v for k, v in config.items() if k.endswith("_token")]
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        named += list(extra.values() if isinstance(extra, dict) else extra)
        decoder = config.get("added_tokens_decoder") or {}
        entries = [(v, bool(v.get("special"))) for _, v in sorted(decoder.items(), key=lambda kv: int(kv[0]))]
        entries += [(v, True) for v in named]
        for value, special in entries:
            token = _added_token(value, special)
            if token is None or token.content in known:
                continue
            known.add(token.content)
            if token.special:
                self.tk.add_special_tokens([token])
            else:
                self.tk.add_tokens([token])

    def _named_id(self, config: dict, key: str, default: int) -> int:
        """The id of the token the config names under key (-1 when it names none, or none there is)."""
        if key not in config:
            return default
        text = token_text(config[key])
        found = self.tk.token_to_id(text) if text is not None else None
        return -1 if found is None else found

    @property
    def bos_token(self) -> str | None:
        return self.tk.id_to_token(self.bos_id) if self.bos_id >= 0 else None

    @property
    def eos_token(self) -> str | None:
        return self.tk.id_to_token(self.eos_id) if self.eos_id >= 0 else None

    def encode(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """The ids of each text alone: no BOS or EOS added. (The library picks its own threads.)"""
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        """The ids a model sees for text as a prompt: transformers' `tokenizer(text).input_ids`."""
        return self.tk.encode(text, add_special_tokens=True).ids

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.tk.id_to_token(i) or "" for i in ids]

    def decode(self, ids: list[int]) -> str:
        text = self.tk.decode(list(ids), skip_special_tokens=True)
        return _clean_up(text) if self._clean_up else text
