"""Export a run for the programs users run models with (llama.cpp, Ollama, LM Studio): GGUF files."""

from .build import Exported, export_gguf

__all__ = ["Exported", "export_gguf"]
