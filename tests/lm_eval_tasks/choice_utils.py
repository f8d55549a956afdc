"""The harness's own HellaSwag preprocessing, so that the reference side of the parity test is lm-eval's code."""

from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401
