"""Small labelled datasets generated in code, so fine-tuning examples need no download."""
from .agents import AGENT_CLASSES, TextClassificationData, agent_task

__all__ = ["AGENT_CLASSES", "TextClassificationData", "agent_task"]
