"""`reference: RUN`: training on top of another run (an SFT run, typically). That run's adapter is merged into the
frozen base before the fresh adapter is added, so the model with the new adapter switched off, which DPO and KTO
compare with, is the earlier run's fine-tuned model. Training, and loading the finished run (generate, chat, eval,
merge, export), build the base this way; a run whose reference was itself trained on top of another run merges
that one's first.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import UserError
from ..core.sources import read_run_config
from .adapter import quiet_peft


def with_reference(base, cfg):
    """`base` (the run's model as loaded) with the adapter of the run `cfg.reference` merged in; `base` itself
    when the run has no reference."""
    if not cfg.reference:
        return base
    from peft import PeftModel

    folder, earlier = reference_adapter(cfg.reference, cfg.model)
    base = with_reference(base, earlier)
    with quiet_peft():
        return PeftModel.from_pretrained(base, folder).merge_and_unload()


def reference_adapter(run: str, model: str) -> tuple[Path, object]:
    """The best adapter of the run folder `run`, and that run's config, which must name the same base `model`."""
    if not Path(run, "config.yaml").is_file():
        raise UserError(f"reference = {run!r}: not a loratune run folder (no config.yaml); give the run to train on")
    earlier = read_run_config(run)
    folder = Path(run, "adapter")
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"reference = {run!r}: the run has no adapter/ (it has not finished); train it to the end")
    if earlier.model != model:
        raise UserError(
            f"reference = {run!r}: that run's adapter is for model {earlier.model!r}, and this run's model is "
            f"{model!r}; set model to {earlier.model!r}"
        )
    return folder, earlier
