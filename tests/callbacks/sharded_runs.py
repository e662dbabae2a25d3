"""Fits under FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) and DDP for ``test_sharded.py``, run with
``torchrun --nproc_per_node=2 sharded_runs.py OUT SCENARIO...`` (2 CPU processes, gloo).

Every scenario writes what the test compares into ``OUT``: the collapsed checkpoint, the compressed export, and a JSON
of each rank's results. Nothing is asserted here except what only a rank can see (errors are recorded, not raised).
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":  # run by torchrun: conftest (tests/) and this checkout's lightning_dwf come first
    sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import PLAIN_FACTOR_LR, ToyModel, build_net, toy_data, trainer_kwargs  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from lightning_dwf import (  # noqa: E402
    CollapseConfig,
    DWFCallback,
    FactorLRConfig,
    QuantizeConfig,
    ScheduleConfig,
    factor_parameters,
    factorize_,
    factorized_tensors,
)
from lightning_dwf.core.sharding import is_sharded, local_tensor  # noqa: E402

EPOCHS = 7  # 512 samples, batch 32, 2 ranks: 8 optimizer steps per epoch (56 in all)
KILL_AT = 2  # the interrupted run stops at the end of this epoch (after 24 of 56 steps: before the recovery phase)


def shard(module: ToyModel) -> None:
    """FSDP2 over the data-parallel mesh: each Linear, then the network."""
    mesh = module.device_mesh["data_parallel"]
    for layer in module.net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(module.net, mesh=mesh)


class ShardedToy(ToyModel):
    """Layers built in ``__init__`` (the callback factorizes them at setup); sharded in ``configure_model`` under
    ModelParallelStrategy, untouched under DDP. ``opt``: "sgd" (momentum 0.9) or "adam"."""

    def __init__(self, opt: str = "sgd", **kwargs) -> None:
        super().__init__(**kwargs)
        self.opt = opt

    def configure_model(self) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy) and not is_sharded(next(self.parameters())):
            shard(self)

    def configure_optimizers(self):
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class LateToy(ToyModel):
    """Layers built in ``configure_model``, factorized there before ``fully_shard`` (the callback adopts them);
    ``order="shard-first"`` shards first, ``"no-factorize"`` never factorizes (both refused)."""

    def __init__(self, order: str = "factorize-first", **kwargs) -> None:
        super().__init__(**kwargs)
        self.order = order
        del self.net

    def configure_model(self) -> None:
        if hasattr(self, "net"):
            return
        torch.manual_seed(1)
        self.net = build_net("linear")
        if self.device_mesh is None:  # `load_from_checkpoint` of the plain model calls this hook too
            return
        if self.order == "factorize-first":
            factorize_(self.net, depth=3)
        shard(self)
        if self.order == "shard-first":
            factorize_(self.net, depth=3)


class KillAt(Callback):
    """Saves a checkpoint at the end of training epoch ``epoch`` (where ``ModelCheckpoint`` saves) and then stops the
    fit with an exception (a killed job)."""

    def __init__(self, epoch: int, path: str) -> None:
        self.epoch, self.path = epoch, path

    def on_train_epoch_end(self, trainer, *args) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("killed")


class PoisonOnce(Callback):
    """Throws the first entry of the first factor to Inf before optimizer step ``at`` (a forced divergence); sharded,
    only the rank holding that entry writes it."""

    def __init__(self, at: int) -> None:
        self.at, self.done = at, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at and not self.done:
            self.done = True
            factor = local_tensor(factor_parameters(pl_module)[0])
            if not is_sharded(factor_parameters(pl_module)[0]) or trainer.global_rank == 0:
                with torch.no_grad():
                    factor.view(-1)[0] = math.inf


class Curve(Callback):
    """λ after every step (as the regime left it)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.dwf = next(c for c in trainer.callbacks if isinstance(c, DWFCallback))
        self.lams: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.lams.append(self.dwf.current_lam)


def dwf_for(mode: str) -> DWFCallback:
    if mode == "quantize":  # the quantization-aware finish (4 bits) on top of target mode
        return DWFCallback(depth=3, target_sparsity=0.9, schedule=ScheduleConfig(recovery=0.4),
                           factor_lr=FactorLRConfig(check="off"), quantize=QuantizeConfig(bits=4, fraction=0.2),
                           collapse=CollapseConfig(export=True))
    if mode == "no-warmup":  # target mode without the factor LR warm-up (which would re-apply a restored LR scale)
        return DWFCallback(depth=3, target_sparsity=0.9, schedule=ScheduleConfig(recovery=0.4),
                           factor_lr=FactorLRConfig(check="off", warmup=0.0), collapse=CollapseConfig(export=True))
    if mode == "lam":  # Adam: the decoupled penalty and the proximal step after each optimizer step
        return DWFCallback(depth=3, lam=0.5, factor_lr=PLAIN_FACTOR_LR, collapse=CollapseConfig(export=True))
    if mode == "dense":  # the same, the survivors fine-tuned as dense weights after the release (gradients dropped)
        return DWFCallback(depth=3, lam=0.5, factor_lr=replace(PLAIN_FACTOR_LR, fixed_pattern="dense"),
                           collapse=CollapseConfig(export=True))
    return DWFCallback(depth=3, target_sparsity=0.9, schedule=ScheduleConfig(recovery=0.4),
                       factor_lr=FactorLRConfig(check="off"), collapse=CollapseConfig(export=True))


def strategy_for(kind: str):
    if kind == "ddp":
        return "ddp"
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                 save_distributed_checkpoint=(kind != "fsdp-full"))


def fit(out: str, name: str, kind: str, mode: str, model=None, callbacks=(), ckpt_path=None) -> dict:
    """One fit; returns the rank's results."""
    seed_everything(0)
    adam = mode in ("lam", "dense")
    model = model if model is not None else ShardedToy("adam" if adam else "sgd", lr=1e-2 if adam else 0.1, n=512)
    dwf, curve = dwf_for(mode), Curve()
    root = os.path.join(out, name)
    trainer = Trainer(**trainer_kwargs(root, strategy=strategy_for(kind), devices=2, max_epochs=EPOCHS,
                                       callbacks=[dwf, curve, *callbacks], enable_checkpointing=False))
    trainer.fit(model, ckpt_path=ckpt_path)
    report = dwf.final_report
    with torch.no_grad():  # the model as the fit leaves it (sharded: still factorized, zeros below the threshold)
        outputs = model(toy_data(8, seed=2).tensors[0]).tolist()
    return {
        "outputs": outputs, "rollbacks": dwf.rollbacks, "factor_lr_scale": dwf.factor_lr_scale,
        "path": dwf.collapsed_checkpoint_path,
        "export": dwf.compression_report.path if dwf.compression_report else None,
        "sparsity": report.sparsity, "nonzero": report.nonzero, "numel": report.numel,
        "lams": curve.lams, "logged_sparsity": float(trainer.callback_metrics["dwf/sparsity"]),
        "factorized": dwf.factorized_names, "sharded": any(is_sharded(p) for p in model.parameters()),
        "still_factorized": bool(factorized_tensors(model)), "step": trainer.global_step,
    }


def killed_and_resumed(out: str, name: str, kind: str, mode: str = "target", poison_at: int | None = None) -> dict:
    path = os.path.join(out, name, "killed.ckpt")
    poison = [PoisonOnce(poison_at)] if poison_at is not None else []
    try:
        fit(out, name + "-killed", kind, mode, callbacks=[*poison, KillAt(KILL_AT, path)])
    except RuntimeError as err:
        if "killed" not in str(err):
            raise
    result = fit(out, name, kind, mode, ckpt_path=path)
    result["checkpoint_is_dir"] = os.path.isdir(path)
    return result


def refused(out: str, name: str, order: str) -> dict:
    try:
        fit(out, name, "fsdp", "target", model=LateToy(order, lr=0.1, n=512))
    except Exception as err:  # noqa: BLE001  (the test checks type and message)
        return {"error": f"{type(err).__name__}: {err}"}
    return {"error": None}


SCENARIOS = {
    "ddp-lam": lambda out: fit(out, "ddp-lam", "ddp", "lam"),
    "fsdp-lam": lambda out: fit(out, "fsdp-lam", "fsdp", "lam"),
    "ddp-dense": lambda out: fit(out, "ddp-dense", "ddp", "dense"),
    "fsdp-dense": lambda out: fit(out, "fsdp-dense", "fsdp", "dense"),
    "ddp-target": lambda out: fit(out, "ddp-target", "ddp", "target"),
    "fsdp-target": lambda out: fit(out, "fsdp-target", "fsdp", "target"),
    "fsdp-resume-sharded": lambda out: killed_and_resumed(out, "fsdp-resume-sharded", "fsdp"),
    "fsdp-resume-full": lambda out: killed_and_resumed(out, "fsdp-resume-full", "fsdp-full"),
    "ddp-rollback": lambda out: fit(out, "ddp-rollback", "ddp", "target", callbacks=[PoisonOnce(30)]),
    "fsdp-rollback": lambda out: fit(out, "fsdp-rollback", "fsdp", "target", callbacks=[PoisonOnce(30)]),
    "fsdp-rollback-no-warmup": lambda out: fit(out, "fsdp-rollback-no-warmup", "fsdp", "no-warmup",
                                               callbacks=[PoisonOnce(10)]),
    "fsdp-resume-after-rollback": lambda out: killed_and_resumed(out, "fsdp-resume-after-rollback", "fsdp", "no-warmup",
                                                                 poison_at=10),
    "ddp-quantize": lambda out: fit(out, "ddp-quantize", "ddp", "quantize"),
    "fsdp-quantize": lambda out: fit(out, "fsdp-quantize", "fsdp", "quantize"),
    "fsdp-late": lambda out: fit(out, "fsdp-late", "fsdp", "target", model=LateToy(lr=0.1, n=512)),
    "refuse-shard-first": lambda out: refused(out, "refuse-shard-first", "shard-first"),
    "refuse-not-factorized": lambda out: refused(out, "refuse-not-factorized", "no-factorize"),
}


def main(out: str, names: list[str]) -> None:
    rank = int(os.environ["RANK"])
    results = {}
    for name in names:
        try:
            results[name] = SCENARIOS[name](out)
        except Exception:  # noqa: BLE001  (recorded for the test's message)
            results[name] = {"crash": traceback.format_exc()[-3000:]}
        if dist.is_initialized():
            dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else str(x))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
