"""softprompt: prompt tuning for frozen causal language models."""

from .artifact import load_classifier
from .backbone import Backbone
from .classify import Classifier
from .run import RunInfo
from .soft_prompt import SoftPrompt, init_prompt
from .taskfile import TaskSpec, load_task
from .template import Template
from .verbalizer import Verbalizer

__all__ = [
    "Backbone",
    "Classifier",
    "RunInfo",
    "SoftPrompt",
    "TaskSpec",
    "Template",
    "Verbalizer",
    "init_prompt",
    "load_classifier",
    "load_task",
]
__version__ = "0.1.0"
