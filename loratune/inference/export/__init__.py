"""Export a run for the programs users run models with (llama.cpp, Ollama, LM Studio): GGUF files."""

__all__ = ["Exported", "export_gguf"]


def __getattr__(name: str):
    # Loaded on first use: importing .formats (the CLI's parser does) runs this package first, and .build loads torch.
    if name in __all__:
        from . import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
