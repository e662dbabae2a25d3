"""Behaviour check for refactors: train fixed scenarios and save every weight and logged DWF metric, or compare two
such files bit for bit.

    python -m benchmarks.identity --out before.pt        # on the old code
    python -m benchmarks.identity --out after.pt         # on the new code
    python -m benchmarks.identity --compare before.pt after.pt

Scenarios (tiny MLP on synthetic data, CPU, one thread, deterministic): a constant fixed λ with SGD (the gradient
penalty) and with AdamW (the proximal step), the default fixed λ (ramped, then released) with SGD and AdamW, target
mode with SGD through its recovery phase, target mode with AdamW, the quantization-aware finish after fixed λ (SGD)
and after target mode (AdamW), and structured DWF (gated output neurons) with a constant and the default fixed λ
(AdamW) and to a MACs budget (SGD and AdamW). A scenario that triggers a rollback is included too (an SGD learning
rate at which the factors overflow; its NaN metrics compare equal).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dwf import BudgetConfig, DWFCallback, FactorizeConfig, FixedLamConfig

#: Structured DWF: the hidden layers' output neurons gated (the output layer stays plain).
GATED = FactorizeConfig(structure="outputs", include=["net.0", "net.2"])
EXAMPLE = torch.zeros(2, 32)
SCENARIOS: dict[str, dict[str, Any]] = {
    "fixed_sgd": dict(opt="sgd", lr=0.1, dwf=dict(regime=FixedLamConfig(0.03, recovery=0))),  # constant λ
    "fixed_sgd_default": dict(opt="sgd", lr=0.1, dwf=dict(lam=0.03)),  # the default: ramped, then released
    "fixed_adamw": dict(opt="adamw", lr=3e-3, dwf=dict(regime=FixedLamConfig(0.05, recovery=0))),  # constant λ
    "fixed_adamw_default": dict(opt="adamw", lr=3e-3, dwf=dict(lam=0.05)),
    "target_sgd": dict(opt="sgd", lr=0.1, dwf=dict(target_sparsity=0.9)),
    "target_adamw": dict(opt="adamw", lr=3e-3, dwf=dict(target_sparsity=0.95)),
    "quant_fixed_sgd": dict(opt="sgd", lr=0.1, dwf=dict(regime=FixedLamConfig(0.03, recovery=0), quantize_bits=4)),
    "quant_target_adamw": dict(opt="adamw", lr=3e-3, dwf=dict(target_sparsity=0.9, quantize_bits=8)),
    "rollback_sgd": dict(opt="sgd", lr=12.0, dwf=dict(regime=FixedLamConfig(1e-3, recovery=0))),
    "gated_fixed_adamw": dict(opt="adamw", lr=3e-3, dwf=dict(regime=FixedLamConfig(0.2, recovery=0), factorize=GATED)),
    "gated_fixed_adamw_default": dict(opt="adamw", lr=3e-3, dwf=dict(lam=0.2, factorize=GATED)),
    "budget_sgd": dict(opt="sgd", lr=0.1, dwf=dict(regime=BudgetConfig(0.3, example_inputs=EXAMPLE), factorize=GATED)),
    "budget_adamw": dict(opt="adamw", lr=3e-3, dwf=dict(regime=BudgetConfig(0.3, example_inputs=EXAMPLE),
                                                       factorize=GATED)),
}


class Tiny(LightningModule):
    def __init__(self, opt: str, lr: float) -> None:
        super().__init__()
        self.opt, self.lr = opt, lr
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        if self.opt == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 32, generator=g)
        y = (x[:, :3].sum(dim=1) > 0).long()
        return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)


class Recorder(Logger):
    """Keeps every ``(step, metrics)`` the callback logs during training (its fit-end ``dwf/final/*`` left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "identity"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "dwf/sparsity" in metrics:
            self.logged.append((int(step or 0), {k: float(v) for k, v in metrics.items()}))


def run(name: str, root: str) -> dict[str, Any]:
    spec = SCENARIOS[name]
    torch.manual_seed(0)
    model = Tiny(spec["opt"], spec["lr"])
    dwf = DWFCallback(depth=3, verbose=False, log_pictures=False, **spec["dwf"])
    recorder = Recorder()
    trainer = Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_epochs=15, logger=recorder,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      log_every_n_steps=5, num_sanity_val_steps=0, callbacks=[dwf])
    error = ""
    try:
        trainer.fit(model)
    except Exception as err:  # a diverged scenario is a result too (a RuntimeError before the exception family)
        error = "diverged" if isinstance(err, RuntimeError) and "NaN/Inf" in str(err) else type(err).__name__
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "logged": recorder.logged,
            "error": error}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical values (NaN equal to NaN: a diverged run's weights)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.isnan(), b.isnan())) and bool(
        torch.equal(a.nan_to_num(), b.nan_to_num()))


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    problems = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            problems.append(f"{name}: only in one file")
            continue
        x, y = a[name], b[name]
        if x["error"] != y["error"]:
            problems.append(f"{name}: error {x['error']!r} vs {y['error']!r}")
        if x["state"].keys() != y["state"].keys():
            problems.append(f"{name}: state keys differ")
        for key in x["state"].keys() & y["state"].keys():
            if not _same(x["state"][key], y["state"][key]):
                problems.append(f"{name}: {key} differs")
        if not _same_logged(x["logged"], y["logged"]):
            problems.append(f"{name}: logged metrics differ")
    return problems


def _same_logged(a: list[tuple[int, dict[str, float]]], b: list[tuple[int, dict[str, float]]]) -> bool:
    """The same steps, metric names and values (NaN equal to NaN: a diverged step's misalignment)."""
    def same(u: float, v: float) -> bool:
        return u == v or (u != u and v != v)

    return len(a) == len(b) and all(
        sa == sb and ma.keys() == mb.keys() and all(same(ma[k], mb[k]) for k in ma) for (sa, ma), (sb, mb) in zip(a, b)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--root", default="/tmp/dwf-identity")
    parser.add_argument("--compare", nargs=2)
    args = parser.parse_args(argv)
    if args.compare:
        problems = compare(*(torch.load(p, weights_only=False) for p in args.compare))
        print("\n".join(problems) or f"bit-identical: {len(SCENARIOS)} scenarios")
        return 1 if problems else 0
    torch.set_num_threads(1)
    results = {}
    for name in SCENARIOS:
        results[name] = run(name, args.root)
        zeros = sum(int((v == 0).sum()) for k, v in results[name]["state"].items() if k.endswith("weight"))
        print(f"{name}: error={results[name]['error'] or '-'} zeros={zeros} logs={len(results[name]['logged'])}")
    torch.save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
