"""DWF under FSDP2 (Lightning's ``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``): 2 CPU processes
(gloo) under ``torchrun``, compared with the same fits under DDP.

``sharded_runs.py`` runs every scenario once (one ``torchrun``, about 15 short fits); the tests read what each rank
recorded and the files the fits wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ToyModel, toy_data

from lightning_dwf import factorized_tensors, load_compressed

from .sharded_runs import LateToy

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIOS = [
    "ddp-lam", "fsdp-lam", "ddp-dense", "fsdp-dense", "ddp-target", "fsdp-target", "fsdp-resume-sharded",
    "fsdp-resume-full", "ddp-rollback", "fsdp-rollback", "fsdp-rollback-no-warmup", "fsdp-resume-after-rollback",
    "ddp-quantize", "fsdp-quantize", "fsdp-late", "refuse-shard-first", "refuse-not-factorized",
]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    """Both ranks' results of every scenario (rank 0, rank 1)."""
    out = tmp_path_factory.mktemp("sharded")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "sharded_runs.py"), str(out), *SCENARIOS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = tuple(json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    crashed = {name: result["crash"] for name, result in ranks[0].items() if "crash" in result}
    assert not crashed, crashed
    return ranks


def collapsed(result: dict) -> dict[str, torch.Tensor]:
    return torch.load(result["path"], weights_only=True)["state_dict"]


def assert_same_fit(ddp: dict, fsdp: dict) -> None:
    """Same weights within float tolerance, the same zeros, the same λ after every step, the same outputs."""
    a, b = collapsed(ddp), collapsed(fsdp)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
        assert torch.equal(a[key] == 0, b[key] == 0), key
    assert fsdp["nonzero"] == ddp["nonzero"] and fsdp["step"] == ddp["step"]
    assert fsdp["lams"] == pytest.approx(ddp["lams"], rel=1e-5)
    torch.testing.assert_close(torch.tensor(fsdp["outputs"]), torch.tensor(ddp["outputs"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["lam", "dense", "target", "rollback", "quantize"])
def test_fsdp2_matches_ddp(runs, mode):
    """Fixed λ (Adam: decoupled penalty and the proximal step on shards), the same with the survivors fine-tuned as
    dense weights after the release (``fixed_pattern="dense"``: the weight put into the first factor on each rank's
    shards, the other factors' gradients dropped), target sparsity (SGD: controller and the gradual global cut), a
    forced divergence rolled back, and the 4-bit quantization-aware finish: FSDP2 ends where DDP ends."""
    rank0, _ = runs
    ddp, fsdp = rank0[f"ddp-{mode}"], rank0[f"fsdp-{mode}"]
    assert fsdp["sharded"] and fsdp["still_factorized"] and not ddp["sharded"]
    assert_same_fit(ddp, fsdp)
    if mode == "dense":  # the fine-tune changed the fit: not the factors' end state
        assert fsdp["outputs"] != rank0["fsdp-lam"]["outputs"]
    if mode not in ("lam", "dense"):  # the target is met exactly (the 4-bit grid may round a few more weights to zero)
        target_nonzero = fsdp["numel"] - round(0.9 * fsdp["numel"])
        if mode == "quantize":
            assert fsdp["nonzero"] <= target_nonzero
        else:
            assert fsdp["nonzero"] == target_nonzero
    if mode == "rollback":
        assert fsdp["rollbacks"] == ddp["rollbacks"] == 1


def test_fsdp2_ranks_agree(runs):
    """Both ranks logged the same sparsity, followed the same λ and report the same results."""
    rank0, rank1 = runs
    for name in ("fsdp-lam", "fsdp-target", "fsdp-rollback", "fsdp-resume-sharded"):
        assert rank0[name] == rank1[name], name
    assert rank0["fsdp-target"]["logged_sparsity"] == pytest.approx(rank0["fsdp-target"]["sparsity"])


@pytest.mark.parametrize(("resumed", "whole"), [("fsdp-resume-sharded", "fsdp-target"),
                                               ("fsdp-resume-full", "fsdp-target"),
                                               ("fsdp-resume-after-rollback", "fsdp-rollback-no-warmup")])
def test_killed_run_resumes_to_the_same_end_state(runs, resumed, whole):
    """Killed after 3 of 7 epochs (before the recovery phase), resumed from Lightning's distributed checkpoint (a
    folder of shards) or a full one: the same collapsed weights, bit for bit, and the same λ from then on. The strategy
    restores the callback's state after fit start: the halved factor step of a rollback before the kill still holds
    (no warm-up re-applies it)."""
    rank0, _ = runs
    resumed, whole = rank0[resumed], rank0[whole]
    assert resumed["checkpoint_is_dir"] == ("full" not in resumed["path"])
    assert (resumed["rollbacks"], resumed["factor_lr_scale"]) == (whole["rollbacks"], whole["factor_lr_scale"])
    a, b = collapsed(whole), collapsed(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["lams"] == whole["lams"][-len(resumed["lams"]):]


@pytest.mark.parametrize(("name", "cls"), [("fsdp-target", ToyModel), ("fsdp-late", ToyModel), ("fsdp-late", LateToy)])
def test_collapsed_checkpoint_loads_strictly_into_the_plain_class(runs, name, cls):
    """The collapsed checkpoint is gathered to one plain state dict: the user's ordinary class loads it (strict),
    without this package, and computes what the sharded model computed at fit end (layers built in ``__init__``, or
    in ``configure_model``, which ``load_from_checkpoint`` calls without a device mesh)."""
    result = runs[0][name]
    model = cls.load_from_checkpoint(result["path"])  # strict
    assert type(model) is cls and not factorized_tensors(model)
    state = torch.load(result["path"], weights_only=True)["state_dict"]
    assert set(state) == set(ToyModel().state_dict())
    assert not any("parametrizations" in k for k in state)
    with torch.no_grad():
        outputs = model(toy_data(8, seed=2).tensors[0])
    torch.testing.assert_close(outputs, torch.tensor(result["outputs"]), rtol=1e-5, atol=1e-6)
    zeros = sum(int((state[k] == 0).sum()) for k in ("net.0.weight", "net.2.weight"))
    assert zeros == result["numel"] - result["nonzero"]


@pytest.mark.parametrize("name", ["fsdp-target", "fsdp-quantize"])
def test_compressed_export_round_trips(runs, name):
    """The export written from the gathered state dict loads into the plain class: exactly the collapsed checkpoint
    (lossless), or its 4-bit grid (the quantization-aware finish trained on it, so again exactly)."""
    result = runs[0][name]
    model = load_compressed(ToyModel(), result["export"])
    state = collapsed(result)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_module_sharded_before_factorizing_is_refused(runs):
    """``fully_shard`` before ``factorize_`` (or never factorizing layers built in ``configure_model``) is refused with
    the fix, never trained silently."""
    rank0, rank1 = runs
    for result in (rank0, rank1):
        first = result["refuse-shard-first"]["error"]
        assert first.startswith("ValueError: Cannot factorize ['0.weight', '2.weight']: the module is already sharded")
        never = result["refuse-not-factorized"]["error"]
        assert never.startswith("MisconfigurationException: DWFCallback under ModelParallelStrategy: the model is "
                                "sharded (4 DTensor parameters")
        for message in (first, never):
            assert "`lightning_dwf.factorize_(module, depth, config)` first and `fully_shard(...)` after" in message
