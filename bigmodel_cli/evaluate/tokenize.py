"""`bigmodel tokenize`: the token ids and pieces a model sees for a text as a prompt, without loading weights."""

from __future__ import annotations

from pathlib import Path

from bigmodel_cli import modelio
from bigmodel_cli.data.tokenizer import AnyTokenizer, find_files, open_tokenizer
from bigmodel_cli.errors import UserError


def tokenizer_of(source: Path | str) -> AnyTokenizer:
    """The tokenizer of a run directory (or checkpoint), an export, hf:DIR, a tokenizer.json or a .model file."""
    if not str(source).startswith(modelio.HF_PREFIX):
        files = find_files(source)  # a tokenizer file, or a directory holding one (run, export, data)
        if files is not None:
            return files.open()
    _, home, _ = modelio.locate(Path(source))  # a checkpoint's run, hf:DIR (refused when not a model)
    return open_tokenizer(home, "the model's tokenizer is missing: restore its tokenizer files")


def run(source: Path | str, text: str) -> dict[str, list]:
    """{"ids": the prompt's ids as transformers would feed them (BOS where it adds one), "tokens": their pieces}."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # command-line bytes that are not UTF-8 arrive as surrogate escapes
        raise UserError(
            "--text is not valid UTF-8: pass UTF-8 text (is the terminal set to another encoding?)"
        ) from None
    tokenizer = tokenizer_of(source)
    ids = tokenizer.encode_prompt(text)
    return {"ids": ids, "tokens": tokenizer.pieces(ids)}
