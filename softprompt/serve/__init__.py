"""Serving: one frozen backbone, many tuned prompts (the task bank), a scheduler that batches rows of
different tasks together, and the HTTP app with its web page."""

from .bank import BankError, ServedTask, TaskBank, TaskNotFound
from .prefix_cache import PrefixCache

__all__ = ["BankError", "PrefixCache", "ServedTask", "TaskBank", "TaskNotFound"]
