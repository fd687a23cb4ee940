"""loratune: fine-tune causal language models with LoRA.

from loratune import TrainConfig, train
summary = train(TrainConfig(train_data="data.jsonl", epochs=3))
"""

from .core.config import TrainConfig
from .core.errors import UserError

__version__ = "0.1.0"
__all__ = ["TrainConfig", "UserError", "train", "__version__"]


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Fine-tune with `config` (same defaults as the CLI); returns the summary also written to summary.json."""
    from .core.sources import resolve
    from .training.loop import train as _train

    if config.output_dir is None:  # same default folder as the CLI
        config = resolve(flags=config.model_dump(exclude_unset=True)).config
    return _train(config, resume=resume, overwrite=overwrite)
