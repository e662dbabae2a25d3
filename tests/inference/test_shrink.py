"""Physical shrink: silent channels removed with everything coupled to them, outputs unchanged; shrunk files saved
without pickle, loaded into a fresh instance, and bad files refused with the module unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_dwf import (
    DWFError,
    DWFFileError,
    FactorizeConfig,
    collapse_,
    factorize_,
    gated_tensors,
    load_shrunk,
    save_compressed,
    save_shrunk,
    shrink_,
)
from lightning_dwf.inference import LinearMultiheadAttention, count_macs_and_params

pytest.importorskip("torch_pruning")


class Residual(nn.Module):
    """conv → BN → ReLU, a residual block (two convs with BatchNorm, added to its input), then an MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        y = self.b3(self.c3(torch.relu(self.b2(self.c2(x)))))
        x = torch.relu(x + y)
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


class Attention(nn.Module):
    """Self-attention written as q/k/v/out ``nn.Linear`` layers with a head count, between an embedding and a head."""

    def __init__(self, width: int = 16, num_heads: int = 4, hard_coded: bool = False) -> None:
        super().__init__()
        self.num_heads, self.hard_coded = num_heads, hard_coded
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        dim = c // self.num_heads if self.hard_coded else -1
        q, k, v = (p(x).view(n, t, self.num_heads, dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(n, t, -1))


class TinyTransformer(nn.Module):
    def __init__(self, hard_coded: bool = False) -> None:
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(6, 16), Attention(hard_coded=hard_coded), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        return self.head((x + self.attn(x)).mean(1))


def heads_gated(dead: dict[str, list[int]], hard_coded: bool = False) -> nn.Module:
    """A TinyTransformer whose q/k/v heads are gated (4 heads of 4), with the heads ``dead[name]`` set to zero."""
    model = trained_like(lambda: TinyTransformer(hard_coded))
    factorize_(model, 3, FactorizeConfig(structure={"attn.[qkv]": "heads"}, num_heads=4, exclude=["embed", "head",
                                                                                                   "attn.out"]))
    with torch.no_grad():
        for t in gated_tensors(model):
            t.gates[0][dead[t.name.split(".")[1]]] = 0
    return collapse_(model)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 3))


def conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                         nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 4))


CASES = {
    "linear_chain": (mlp, (5, 12), ["4"]),
    "conv_bn": (conv_bn, (2, 3, 8, 8), ["7"]),
    "residual": (Residual, (2, 3, 8, 8), ["fc2"]),
}


def trained_like(make, seed: int = 0) -> nn.Module:
    """A model with non-trivial BatchNorm statistics and shifts (a zero filter before BN would not be silent)."""
    torch.manual_seed(seed)
    model = make()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
            if isinstance(m, nn.Linear | nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def gated_with_zeros(make, exclude, seed: int = 0) -> nn.Module:
    model = trained_like(make, seed)
    factorize_(model, 3, FactorizeConfig(structure="outputs", exclude=exclude))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in gated_tensors(model):
            dead = torch.randperm(t.groups, generator=generator)[: t.groups // 2]
            t.gates[0][dead] = 0
    return collapse_(model)


@pytest.mark.parametrize("case", list(CASES))
def test_shrink_removes_silent_channels_and_keeps_the_outputs(case):
    make, shape, exclude = CASES[case]
    model = gated_with_zeros(make, exclude)
    x = torch.randn(*shape)
    expected = model(x)
    report = shrink_(model, x)
    assert report.removed, "nothing was removed"
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert report.max_abs_diff <= 1e-5


def test_residual_channels_go_only_when_every_writer_is_silent():
    """A residual channel stays while one of the layers that write it (b1 or b3) is alive there."""
    model = trained_like(Residual)
    factorize_(model, 3, FactorizeConfig(structure="outputs", exclude=["fc2"]))
    with torch.no_grad():
        gates = {t.name: t.gates[0] for t in gated_tensors(model)}
        gates["b1.weight"][[0, 1, 2]] = 0
        gates["b3.weight"][[1, 2, 3]] = 0
    collapse_(model)
    report = shrink_(model, torch.randn(2, 3, 8, 8))
    assert model.c1.out_channels == 6 and model.c3.out_channels == 6  # channels 1 and 2 only
    assert report.max_abs_diff <= 1e-5


def test_a_zero_filter_before_an_ungated_batch_norm_is_not_removed():
    model = trained_like(conv_bn)
    with torch.no_grad():
        model[0].weight[:3] = 0
        model[0].bias[:3] = 0  # BN still outputs its shift there: not silent
    shrink_(model, torch.randn(2, 3, 8, 8))
    assert model[0].out_channels == 8


def test_attention_heads_go_when_q_k_v_are_all_silent_there(tmp_path):
    """Heads 1 and 3 are zero in q, k and v and go, with the out projection's columns; head 2 is zero in v only (its
    queries and keys are alive) and stays, as heads are removed only when every projection that writes them is
    silent."""
    model = heads_gated({"q": [1, 3], "k": [1, 3], "v": [1, 2, 3]})
    x = torch.randn(2, 5, 6)
    expected = model(x)
    report = shrink_(model, x)
    assert model.attn.num_heads == 2 and report.heads == {"attn": ("num_heads", 2)}
    assert model.attn.q.out_features == model.attn.v.out_features == model.attn.out.in_features == 8
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    path = tmp_path / "model.dwf"
    save_shrunk(model, path, report, x)
    fresh = TinyTransformer().eval()
    load_shrunk(fresh, path)
    assert fresh.attn.num_heads == 2
    torch.testing.assert_close(fresh(x), model(x))


def test_a_head_count_beside_layers_without_attention_is_left_alone():
    """Two Linear layers added together under a module that holds ``num_heads`` are not attention: their silent
    channels go one by one and the count stays."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads = 4
            self.w1, self.w3, self.w2 = nn.Linear(6, 16), nn.Linear(6, 16), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.w2(torch.relu(self.w1(x) + self.w3(x)))

    model = Block().eval()
    with torch.no_grad():
        for layer in (model.w1, model.w3):
            layer.weight[[0, 5]] = 0
            layer.bias[[0, 5]] = 0
    report = shrink_(model, torch.randn(2, 6))
    assert model.w1.out_features == 14 and model.num_heads == 4 and not report.heads


def test_a_forward_with_hard_coded_widths_is_refused_and_undone():
    model = heads_gated({"q": [1], "k": [1], "v": [1]}, hard_coded=True)
    x = torch.randn(2, 5, 6)
    expected = model(x)
    with pytest.raises(DWFError, match="derive widths from the layers"):
        shrink_(model, x)
    assert model.attn.num_heads == 4 and model.attn.q.out_features == 16
    torch.testing.assert_close(model(x), expected)


class Encoder(nn.Module):
    """Linear embedding, two ``nn.TransformerEncoderLayer`` blocks (nn.MultiheadAttention, 4 heads of 4), a Linear
    head."""

    def __init__(self, batch_first: bool = True, add_bias_kv: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, 16)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first),
                                         2, enable_nested_tensor=False)
        if add_bias_kv:
            self.enc.layers[0].self_attn = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, L, 6)
        h = self.embed(x if self.batch_first else x.transpose(0, 1))
        return self.head(self.enc(h).mean(1 if self.batch_first else 0))


def mha_gated(dead: list[list[int]], **kwargs) -> nn.Module:
    """An :class:`Encoder` with its attention heads gated, the heads ``dead[block]`` at zero gates, collapsed."""
    model = trained_like(lambda: Encoder(**kwargs))
    attention = "enc.layers.*.self_attn"
    factorize_(model, 3, FactorizeConfig(structure={attention: "heads"}, include=[attention]))
    with torch.no_grad():
        for t, heads in zip(gated_tensors(model), dead, strict=True):
            t.gates[0][heads] = 0
    return collapse_(model).eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads_go_after_a_linear_rewrite(batch_first, tmp_path):
    """nn.MultiheadAttention cannot lose a head; shrink_ rewrites it with Linear projections (the same function),
    removes its silent heads there, and a fresh instance loads the file the same way."""
    model = mha_gated([[1, 2], [0]], batch_first=batch_first)
    x = torch.randn(2, 5, 6)
    expected = model(x)
    report = shrink_(model, x)
    assert report.attention == ["enc.layers.0.self_attn", "enc.layers.1.self_attn"]
    assert report.heads == {"enc.layers.0.self_attn": ("num_heads", 2), "enc.layers.1.self_attn": ("num_heads", 3)}
    attn = model.enc.layers[0].self_attn
    assert (attn.q.out_features, attn.out.in_features) == (8, 8) and model.enc.layers[1].self_attn.v.out_features == 12
    assert report.macs_after < report.macs_before and report.params_after < report.params_before
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # the layers' fused inference path is declined, not broken
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    path = tmp_path / "shrunk.safetensors"
    save_shrunk(model, path, report, x)
    fresh = load_shrunk(Encoder(batch_first=batch_first), path)
    torch.testing.assert_close(fresh.eval()(x), expected, atol=1e-5, rtol=1e-5)


def test_macs_are_per_sample_whatever_axis_a_layer_sees_the_batch_on():
    """A sequence-first encoder inside a batch-first model counts the MACs of the batch-first one, at any batch size
    (the count divides each layer's MACs by the input's first axis, not by the layer's own first axis), and
    nn.MultiheadAttention counts what its Linear rewrite counts."""
    torch.manual_seed(0)
    first, inner = Encoder(batch_first=True), Encoder(batch_first=False)
    inner.load_state_dict(first.state_dict())
    x1 = torch.randn(1, 5, 6)
    per_sample = count_macs_and_params(first, x1)[0]
    assert per_sample == count_macs_and_params(first, torch.randn(3, 5, 6))[0]
    assert per_sample == count_macs_and_params(inner, torch.randn(3, 5, 6))[0]
    assert per_sample == count_macs_and_params(inner, (torch.randn(2, 5, 6),))[0]
    for layer in first.enc.layers:  # nn.MultiheadAttention counts its projections as its Linear rewrite does
        layer.self_attn = LinearMultiheadAttention.from_mha(layer.self_attn)
    assert count_macs_and_params(first, torch.randn(2, 5, 6)) == (per_sample, count_macs_and_params(inner, x1)[1])


def test_multihead_attention_that_cannot_be_rewritten_or_is_ignored_is_kept():
    model = mha_gated([[1], [0]], add_bias_kv=True)  # block 0's bias_k/bias_v are not gated: its heads stay
    x = torch.randn(2, 5, 6)
    expected = model(x)
    report = shrink_(model, x)
    assert "add_bias_kv" in report.skipped["enc.layers.0.self_attn"]
    assert isinstance(model.enc.layers[0].self_attn, nn.MultiheadAttention) and report.attention == [
        "enc.layers.1.self_attn"]
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    kept = mha_gated([[1], [0]])
    report = shrink_(kept, x, ignored_layers=[kept.enc.layers[1].self_attn])  # ignored: stays packed and whole
    assert report.attention == ["enc.layers.0.self_attn"]
    assert isinstance(kept.enc.layers[1].self_attn, nn.MultiheadAttention)


def test_model_outputs_stay_and_a_factorized_model_is_refused():
    model = gated_with_zeros(mlp, [])  # the last layer is gated too, but its outputs are the model's
    report = shrink_(model, torch.randn(5, 12))
    assert model[4].out_features == 3 and "4" in report.skipped
    factorized = nn.Linear(3, 2)
    factorize_(factorized, 2)
    with pytest.raises(ValueError, match="collapse"):
        shrink_(factorized, torch.randn(1, 3))


def test_a_shrink_that_would_change_the_outputs_is_refused_and_undone(monkeypatch):
    import lightning_dwf.inference.shrink as shrink_module

    model = gated_with_zeros(mlp, ["4"])
    x = torch.randn(5, 12)
    expected = model(x)
    monkeypatch.setattr(shrink_module, "zero_channels",
                        lambda module, positions: torch.arange(len(positions)) < len(positions) // 2)
    with pytest.raises(DWFError, match="restored unchanged"):
        shrink_(model, x)
    assert model[0].out_features == 32
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("case", ["linear_chain", "residual"])
def test_shrunk_files_round_trip_into_a_fresh_instance(tmp_path, case):
    make, shape, exclude = CASES[case]
    model = gated_with_zeros(make, exclude)
    x = torch.randn(*shape)
    report = shrink_(model, x)
    path = tmp_path / "model.dwf"
    save_shrunk(model, path, report, x)
    fresh = make().eval()
    assert load_shrunk(fresh, path) is fresh
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    torch.testing.assert_close(fresh(x), model(x))
    with open(path, "rb") as f:
        assert f.read(9)[8:] == b"{"  # safetensors: an 8-byte length, then a JSON header; no pickle stream


def test_bad_shrunk_files_are_refused_and_change_nothing(tmp_path):
    model = gated_with_zeros(mlp, ["4"])
    x = torch.randn(5, 12)
    report = shrink_(model, x)
    path = tmp_path / "model.dwf"
    save_shrunk(model, path, report, x)
    other = conv_bn()
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(DWFFileError, match="not a"):
        load_shrunk(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    plain_file = tmp_path / "plain.dwf"
    save_compressed(mlp(), plain_file)
    fresh = mlp()
    with pytest.raises(DWFFileError, match="not a shrunk-model file"):
        load_shrunk(fresh, plain_file)
    assert fresh[0].out_features == 32
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "corrupt.dwf").write_bytes(bytes(data))
    with pytest.raises(DWFFileError):
        load_shrunk(fresh, tmp_path / "corrupt.dwf")
    assert fresh[0].out_features == 32


def test_decoder_self_and_cross_attention_heads_go():
    """nn.TransformerDecoderLayer: the self-attention and the cross-attention (queries from the target, keys and values
    from the memory) each lose their silent head, and the outputs stay."""

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 16)
            layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
            self.dec, self.head = nn.TransformerDecoder(layer, 1), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            return self.head(self.dec(h[:, :3], h).mean(1))

    torch.manual_seed(0)
    model = Decoder().eval()
    with torch.no_grad():
        for attention in (model.dec.layers[0].self_attn, model.dec.layers[0].multihead_attn):
            attention.in_proj_weight.view(3, 4, 4, 16)[:, 1] = 0
            attention.in_proj_bias.view(3, 4, 4)[:, 1] = 0
    x = torch.randn(2, 5, 6)
    expected = model(x)
    report = shrink_(model, x)
    assert report.heads == {"dec.layers.0.self_attn": ("num_heads", 3), "dec.layers.0.multihead_attn": ("num_heads", 3)}
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
