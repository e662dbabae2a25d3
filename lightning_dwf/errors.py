"""The exceptions and warnings the package raises, and the texts that explain a failure and its fix.

Every exception lightning-dwf raises on purpose for a failed run or a bad file derives from :class:`DWFError`, so one
``except DWFError`` catches them; each also derives from the built-in type it replaced (``RuntimeError``,
``ValueError``), so older ``except`` clauses keep working. Every warning derives from :class:`DWFWarning`. Invalid
arguments raise ``TypeError``/``ValueError`` at construction, naming the argument and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence


class DWFError(Exception):
    """Base class of the exceptions lightning-dwf raises for a failed run or a file it cannot read."""


class DWFDivergenceError(DWFError, RuntimeError):
    """The weights went non-finite after every allowed rollback (``FactorLRConfig.rollbacks``): the run stopped and
    no collapsed checkpoint was written. Benchmarks catch it to record a diverged run."""


class DWFFileError(DWFError, ValueError):
    """A file is not what the loader expects (another format, a damaged file, or a model of another shape); nothing
    was changed."""


class DWFWarning(UserWarning):
    """Base class of the warnings lightning-dwf emits."""


class DWFLearningRateWarning(DWFWarning):
    """The factor learning rate is below the floor needed to reach exact zeros (silence with ``check="off"``)."""


class DWFDeadLayerWarning(DWFWarning):
    """Every weight of a factorized tensor is (or would collapse to) zero: the layer no longer passes its input on."""


class DWFRollbackWarning(DWFWarning):
    """The weights went non-finite and training stepped back to its last finite state with a smaller factor step."""


def rollback_message(names: Sequence[str], step: int, back_to: int, scale: float, left: int) -> str:
    """Non-finite factors, handled by a rollback: what happened and how to avoid it."""
    return (
        f"DWFCallback: the weights of {list(names[:5])} became NaN/Inf at step {step}; training stepped back to the "
        f"state of step {back_to} (the last finite one) and the factors' step is now ×{scale:g} of the optimizer's "
        f"(logged as dwf/rollbacks and dwf/factor_lr_scale; {left} more rollbacks allowed). If this recurs, lower the "
        "learning rate or clip gradients (Trainer(gradient_clip_val=...))."
    )


def dead_layer_message(names: Sequence[str], what: str, detail: str, fix: str) -> str:
    """Why ``names`` are entirely zero, and ``fix``: what to change for the regime the run is in
    (:meth:`~lightning_dwf.training.regimes.Regime.dead_layer_fix`)."""
    shown = f"{list(names[:5])}{' …' if len(names) > 5 else ''}"
    return (f"DWFCallback: {what} {shown} {detail}: through these layers the output no longer depends on the input "
            f"(expect chance accuracy). {fix}")


def divergence_message(names: Sequence[str], step: int, lrs: Sequence[float], depth: int) -> str:
    """Non-finite factors: where, and what to change."""
    return (
        f"DWFCallback: the factors of {list(names[:5])} became NaN/Inf at step {step} (learning rates {list(lrs)}, "
        f"depth {depth}), after every allowed rollback (FactorLRConfig.rollbacks) or with no finite state to go back "
        "to. The learning rate is too large for this depth: lower it (or FactorLRConfig.multiplier), add a warm-up, "
        "or clip gradients (Trainer(gradient_clip_val=...)). No collapsed checkpoint was written."
    )


#: Resuming DWF training from a checkpoint that holds no factors.
PLAIN_CHECKPOINT_MESSAGE = (
    "`ckpt_path` points to a plain checkpoint (dense, or DWF's collapsed one) but resuming DWF training needs a "
    "checkpoint written during DWF training (it holds the factors and the optimizer state). To start DWF from these "
    "weights, load them (MyModule.load_from_checkpoint(path)) and call trainer.fit(model) without ckpt_path, with "
    "DWFCallback(factorize=FactorizeConfig(init='balanced'))."
)
