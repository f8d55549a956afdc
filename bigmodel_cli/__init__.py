"""bigmodel: raw text to a pretrained, finetuned, evaluated and exported Llama-style Transformer."""

__version__ = "0.1.0"
