"""Wall-clock latency of ``nn.TransformerEncoder`` models whose ``nn.MultiheadAttention`` heads were removed by
``shrink_`` (rewritten with Linear projections first), against the same model unshrunk in one process.

    python -m benchmarks.mha_shrink                      # results/mha_shrink.{jsonl,md}
    python -m benchmarks.mha_shrink --report             # only rewrite the table

An encoder of width 256, 8 heads of 32, feed-forward 1024, 4 layers, on 64 tokens (batch first), with a fraction of the
heads of every layer set to exact zero (q, k, v rows and biases, as a zero D-Gating gate leaves them; which heads, drawn
per layer from the seed). Timed in inference mode (``torch.utils.benchmark``, median, threads fixed):

* ``unshrunk``: the model as trained, its layers on PyTorch's fused inference path (``nn.MultiheadAttention``'s
  packed projection; the zero heads are computed);
* ``rewritten``: the same function with Linear projections and no head removed (what the rewrite costs alone: the
  layers leave the fused path);
* ``shrunk``: after ``shrink_`` (the zero heads removed).

A timing of shapes, not of a trained model: the accuracy is the unshrunk model's by construction (outputs equal,
checked).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics

import torch
from torch import nn

from benchmarks.fit_cost import round_ratio
from benchmarks.harness.store import RESULTS, append_rows, read_rows, versions
from benchmarks.structured_speed import latency
from lightning_dwf import shrink_
from lightning_dwf.inference.attention import rewrite_attention_

OUT = RESULTS / "mha_shrink.jsonl"
WIDTH, HEADS, LAYERS, TOKENS = 256, 8, 4, 64


class Encoder(nn.Module):
    """Tokens → ``nn.TransformerEncoder`` (batch first) → mean over tokens → a 10-way Linear head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


def with_zero_heads(fraction: float, seed: int) -> Encoder:
    """A seeded :class:`Encoder` with ``fraction`` of each layer's heads at exact zero in q, k and v."""
    torch.manual_seed(seed)
    model = Encoder().eval()
    generator = torch.Generator().manual_seed(seed)
    head_dim = WIDTH // HEADS
    with torch.no_grad():
        for layer in model.enc.layers:
            dead = torch.randperm(HEADS, generator=generator)[: round(fraction * HEADS)]
            layer.self_attn.in_proj_weight.view(3, HEADS, head_dim, WIDTH)[:, dead] = 0
            layer.self_attn.in_proj_bias.view(3, HEADS, head_dim)[:, dead] = 0
    return model


def rewritten(model: Encoder) -> Encoder:
    """``model`` with every attention rewritten with Linear projections, no head removed."""
    out = copy.deepcopy(model)
    for i in range(len(out.enc.layers)):
        rewrite_attention_(out, f"enc.layers.{i}.self_attn")
    return out


def measure(fractions: list[float], batches: list[int], rounds: int, min_run_time: float, seed: int) -> list[dict]:
    rows = []
    for fraction in fractions:
        base = with_zero_heads(fraction, seed)
        shrunk = copy.deepcopy(base)
        example = torch.randn(1, TOKENS, WIDTH, generator=torch.Generator().manual_seed(seed))
        report = shrink_(shrunk, example)
        models = {"unshrunk": base, "rewritten": rewritten(base), "shrunk": shrunk}
        for batch in batches:
            x = torch.randn(batch, TOKENS, WIDTH, generator=torch.Generator().manual_seed(seed + 1))
            with torch.inference_mode():
                reference = base(x)
                for model in models.values():
                    torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=1e-4)
            times: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(rounds):  # alternated, so that drift of the machine hits all alike
                for name, model in models.items():
                    times[name].append(latency(model, x, min_run_time))
            ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            row = dict(fraction=fraction, batch=batch, seed=seed,
                       heads_left=sorted({c for _, c in report.heads.values()}),
                       macs_ratio=report.macs_ratio, params_ratio=report.params_after / report.params_before,
                       ms=ms, round_ms={n: [1e3 * v for v in t] for n, t in times.items()},
                       threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                       versions=versions(["torch"]))
            print(row, flush=True)
            rows.append(row)
    return rows


def _ratio(row: dict, top: str, bottom: str) -> str:
    """``top / bottom`` over the row's rounds (:func:`~benchmarks.fit_cost.round_ratio`), as a table cell."""
    median, (low, high) = round_ratio(row["round_ms"][top], row["round_ms"][bottom])
    return f"{median:.2f}× ({low:.2f}–{high:.2f})"


def write_report() -> None:
    rows = read_rows(OUT) if OUT.exists() else []
    if rows:
        (RESULTS / "mha_shrink.md").write_text(table(rows))


def table(rows: list[dict]) -> str:
    """The markdown table of the latest row of each (fraction, batch)."""
    latest = {(r["fraction"], r["batch"]): r for r in rows}
    lines = [
        "# Removing heads of nn.MultiheadAttention",
        "",
        f"`python -m benchmarks.mha_shrink`: a {LAYERS}-layer `nn.TransformerEncoder` (width {WIDTH}, {HEADS} heads, "
        f"{TOKENS} tokens), a fraction of every layer's heads at exact zero; inference-mode latency, median of "
        "alternated rounds, in ms; MACs of the Linear layers (attention scores not counted). Ratios: the median over "
        "the rounds of the ratio within each round (smallest–largest), against `unshrunk` (PyTorch's fused path, the "
        "zero heads computed).",
        "",
        "| heads zero | batch | threads | MACs after / before | unshrunk ms | rewritten ms | shrunk ms | "
        "rewritten / unshrunk | speed-up of shrunk |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (fraction, batch), r in sorted(latest.items()):
        ms = r["ms"]
        lines.append(f"| {fraction:.0%} | {batch} | {r['threads']} | {r['macs_ratio']:.3f} | {ms['unshrunk']:.2f} | "
                     f"{ms['rewritten']:.2f} | {ms['shrunk']:.2f} | {_ratio(r, 'rewritten', 'unshrunk')} | "
                     f"{_ratio(r, 'unshrunk', 'shrunk')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="only rewrite the table from the rows")
    args = parser.parse_args()
    if not args.report:
        torch.set_num_threads(args.threads)
        append_rows(OUT, measure(args.fractions, args.batches, args.rounds, args.min_run_time, args.seed))
    write_report()


if __name__ == "__main__":
    main()
