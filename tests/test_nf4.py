"""NF4 format and NF4Linear against bitsandbytes on CPU (fp32 unless stated; tolerances stated per test).

bitsandbytes 0.50 on CPU, what it runs and how we compare:
- quantize_4bit: its default PyTorch op (bucketize against midpoints) -> packed bytes and absmax
  must be identical; elements may differ only at exact ties (none occur in these tensors).
- quantize_blockwise (double quant, 8-bit): its native CPU library, whose binary search
  sometimes returns the second-nearest code for small values. We round to the nearest (as its
  default op and its CUDA kernel do), so there we assert ours is never farther than bnb's.
- dequantize_4bit: its native CPU kernel assumes blocksize divides the last dimension (it blocks
  per row); for other shapes we compare with bnb's reference op (the flat layout CUDA also uses).
"""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from phicore.frozen_linear import NF4Linear, quantize_model_linears
from phicore.kernels import dequantize_nf4, nf4_absmax
from phicore.nf4 import (
    NF4State,
    bnb_entries,
    create_dynamic_map,
    nf4_code,
    quantize_nf4,
    state_from_bnb_entries,
)

SHAPES = [(128, 256), (33, 17), (7,), (300, 257), (2, 3, 64)]
BLOCKSIZES = [64, 128, 256]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes")


def _weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def _unpack(packed, n):
    b = packed.reshape(-1).long()
    return torch.stack((b >> 4, b & 0xF), dim=1).reshape(-1)[:n]


def _scaled(weight, blocksize):
    """x * (1 / absmax[block]) in fp32, the value that gets rounded."""
    x = weight.reshape(-1).float()
    n = x.numel()
    blocks = F.pad(x, (0, -n % blocksize)).view(-1, blocksize)
    return (blocks * (1.0 / blocks.abs().amax(1).clamp(min=1e-38))[:, None]).reshape(-1)[:n]


def _bnb_state(bnb, packed, state):
    """A bitsandbytes QuantState built from our serialised entries (exercises our keys and JSON)."""
    return bnb.functional.QuantState.from_dict(bnb_entries(state), device="cpu")


def _bnb_dequantize(bnb, packed, quant_state):
    """bitsandbytes' dequantisation; its reference op where its native CPU kernel mis-blocks."""
    shape = quant_state.shape
    if shape[-1] % quant_state.blocksize == 0:
        return bnb.functional.dequantize_4bit(packed, quant_state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = bnb.functional.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    code = bnb.functional.get_4bit_type("nf4", device="cpu")
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip its torch.compile
    return fn(packed.reshape(-1), absmax, code, quant_state.blocksize, shape, quant_state.dtype)


# --------------------------------------------------------------------------- format parity


def test_code_tables_match_bnb(bnb):
    assert torch.equal(create_dynamic_map(), bnb.functional.create_dynamic_map())
    assert torch.equal(nf4_code(), bnb.functional.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_bytes_and_absmax_match_bnb(bnb, blocksize, dtype):
    code = nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    for seed, shape in enumerate(SHAPES):
        w = _weight(shape, dtype, seed)
        packed, state = quantize_nf4(w, blocksize, double_quant=False)
        ref_packed, ref_state = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
        assert packed.shape == ref_packed.shape == ((w.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
        assert torch.equal(state.absmax, ref_state.absmax)
        # elements may differ only where the scaled value is exactly a midpoint
        n = w.numel()
        differ = _unpack(packed, n) != _unpack(ref_packed, n)
        ties = torch.isin(_scaled(w, blocksize), midpoints)
        assert not (differ & ~ties).any(), f"{shape}: {int(differ.sum())} codes differ away from ties"
        assert torch.equal(packed, ref_packed), f"{shape}: {int(differ.sum())} codes differ, all at exact ties"


def test_exact_ties_take_the_lower_code(bnb):
    # absmax 1.0 makes scaled == x exactly; every midpoint must round to the code below it,
    # as bnb's CPU op (bucketize) and its CUDA decision tree (`x > threshold`) both do.
    code = nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    w = torch.cat([torch.tensor([1.0]), midpoints, -midpoints, torch.zeros(64 - 31)])
    packed, _ = quantize_nf4(w, 64, double_quant=False)
    assert torch.equal(_unpack(packed, 64)[1:16], torch.arange(15))
    ref_packed, _ = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, ref_packed)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_double_quant_matches_bnb(bnb, blocksize):
    dyn = create_dynamic_map()
    differing = total = 0
    for seed, shape in enumerate([(512, 256), (300, 257), (64, 1000)]):
        w = _weight(shape, torch.bfloat16, seed)
        packed, state = quantize_nf4(w, blocksize, double_quant=True)
        ref_packed, ref = bnb.functional.quantize_4bit(
            w, blocksize=blocksize, compress_statistics=True, quant_type="nf4"
        )
        assert torch.equal(packed, ref_packed)
        assert state.offset == ref.offset.item()
        assert torch.equal(state.nested_absmax, ref.state2.absmax)
        assert torch.equal(state.nested_code, ref.state2.code)
        assert state.absmax.dtype == ref.absmax.dtype == torch.uint8
        # ours is the nearest code; where bnb's native CPU search picks another, it is farther
        raw = quantize_nf4(w, blocksize, double_quant=False)[1].absmax - state.offset
        s = _scaled(raw, 256)
        ours = (s - dyn[state.absmax.long()]).abs()
        theirs = (s - dyn[ref.absmax.long()]).abs()
        assert torch.equal(ours, (s[:, None] - dyn[None, :]).abs().min(dim=1).values)
        assert (ours <= theirs).all()
        differing += int((state.absmax != ref.absmax).sum())
        total += state.absmax.numel()
    assert differing <= 0.01 * total, f"{differing}/{total} nested codes differ from bnb's CPU search"


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_dequantize_matches_bnb(bnb, blocksize, double_quant):
    for seed, shape in enumerate(SHAPES):
        for dtype in DTYPES:
            w = _weight(shape, dtype, seed)
            # bnb's own quantisation, read through our reader of its entries, dequantised by both
            ref_packed, ref_state = bnb.functional.quantize_4bit(
                w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
            )
            packed, state = ref_packed, state_from_bnb_entries(ref_state.as_dict(packed=True))
            ours = dequantize_nf4(packed, state, dtype, backend="torch")
            ref = _bnb_dequantize(bnb, ref_packed, ref_state)
            assert ours.shape == ref.shape and ours.dtype == ref.dtype == dtype
            rel = ((ours.float() - ref.float()).abs() / ref.float().abs().clamp(min=1e-30)).max().item()
            assert rel <= 1e-6, f"{shape} {dtype}: max relative error {rel}"
            # and our quantisation read back by bnb dequantises to the same weight
            packed, state = quantize_nf4(w, blocksize, double_quant)
            ref = _bnb_dequantize(bnb, packed, _bnb_state(bnb, packed, state))
            assert torch.equal(ref, dequantize_nf4(packed, state))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_serialised_entries_match_bnb(bnb, dtype, double_quant):
    w = _weight((96, 128), dtype, 0)
    packed, state = quantize_nf4(w, 64, double_quant)
    _, ref = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    if double_quant:  # the 8-bit codes may differ by bnb's CPU search (test_double_quant_matches_bnb)
        state.absmax = ref.absmax
    ours = bnb_entries(state)
    theirs = ref.as_dict(packed=True)
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    meta = json.loads(bytes(ours["quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["dtype"] == str(dtype).removeprefix("torch.") and meta["shape"] == [96, 128]


# --------------------------------------------------------------------------- NF4Linear and Linear4bit


def _bnb_linear(bnb, dense, double_quant=True):
    layer = bnb.nn.Linear4bit(
        dense.in_features,
        dense.out_features,
        bias=dense.bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type="nf4",
    )
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # quantises; left in training mode (bnb's CPU eval path repacks weights)


def _dense(in_features, out_features, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_matches_linear4bit(bnb, double_quant):
    dense = _dense(192, 80)
    ref = _bnb_linear(bnb, dense, double_quant).state_dict()
    ours = NF4Linear.from_linear(_dense(192, 80), double_quant=double_quant).state_dict()
    assert list(ours) == list(ref)
    for key, value in ref.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        if key == "weight.absmax" and double_quant:  # bnb's CPU 8-bit search (test_double_quant_matches_bnb)
            assert (ours[key] != value).float().mean() <= 0.01
        else:
            assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_state_dict_loads_into_nf4linear(bnb, double_quant, assign):
    bnb_layer = _bnb_linear(bnb, _dense(128, 48), double_quant)
    device = "meta" if assign else None
    layer = NF4Linear(128, 48, double_quant=not double_quant, device=device)  # built with the other setting
    result = layer.load_state_dict(bnb_layer.state_dict(), assign=assign)
    assert not result.missing_keys and not result.unexpected_keys
    assert layer.double_quant == double_quant
    x = torch.randn(5, 128)
    torch.testing.assert_close(layer(x), bnb_layer(x), rtol=1e-6, atol=1e-6)


def test_nf4linear_state_dict_loads_into_linear4bit(bnb):
    ours = NF4Linear.from_linear(_dense(128, 48))
    sd = ours.state_dict()
    layer = bnb.nn.Linear4bit(128, 48, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k[len("weight.") :]: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=layer)
    layer.bias = nn.Parameter(sd["bias"].clone())
    x = torch.randn(5, 128)
    torch.testing.assert_close(layer(x), ours(x), rtol=1e-6, atol=1e-6)
    back = layer.state_dict()
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("double_quant", [False, True])
def test_gradients_match_dense_linear(double_quant):
    layer = NF4Linear.from_linear(_dense(96, 40), double_quant=double_quant)
    layer.bias.requires_grad_(True)  # frozen by default; the bias gradient path is tested too
    dense = nn.Linear(96, 40)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantize())
        dense.bias.copy_(layer.bias)
    x = torch.randn(2, 3, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad = torch.randn(2, 3, 40)
    layer(x).backward(grad)
    dense(x_ref).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, rtol=1e-6, atol=1e-6)
    assert layer.weight.grad is None


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_autograd_saves_no_dense_weight():
    layer = NF4Linear.from_linear(_dense(96, 40))
    x = torch.randn(4, 96, requires_grad=True)
    shapes = _saved_shapes(lambda: layer(x).sum())
    assert (40, 96) not in shapes and (96, 40) not in shapes, shapes
    assert layer.weight.shape in shapes  # the packed bytes are what backward uses
    # the hook does see a dense weight when autograd records the dequantisation itself
    naive = _saved_shapes(lambda: (x @ layer.dequantize().requires_grad_(True).t()).sum())
    assert (40, 96) in naive or (96, 40) in naive


def test_compute_dtype_bfloat16():
    layer = NF4Linear.from_linear(_dense(128, 64), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 128)
    y = layer(x)
    assert y.dtype == torch.float32
    ref = F.linear(x.bfloat16(), layer.dequantize(), layer.bias.bfloat16()).float()
    assert torch.equal(y, ref)


# --------------------------------------------------------------------------- module plumbing


def test_to_dtype_keeps_quant_state_float32():
    layer = NF4Linear.from_linear(_dense(128, 64, seed=3), double_quant=False)
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.absmax.dtype == layer.quant_map.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16 and layer.weight.dtype == torch.uint8
    assert torch.equal(layer.dequantize(), before)


def test_state_loads_with_other_blocksize():
    source = NF4Linear.from_linear(_dense(128, 64), blocksize=128, double_quant=False)
    layer = NF4Linear(128, 64, blocksize=64, double_quant=True)
    layer.load_state_dict(source.state_dict())
    assert layer.blocksize == 128 and not layer.double_quant
    assert torch.equal(layer.dequantize(), source.dequantize())


@pytest.mark.parametrize("double_quant", [False, True])
def test_dense_weight_is_quantised_on_load(double_quant):
    """A dense state dict (nn.Linear's keys) loads into an NF4Linear: the layer quantises the
    weight itself (its blocksize and double quantisation) and keeps only the packed bytes."""
    dense = _dense(192, 80, seed=4)
    expected = NF4Linear.from_linear(_dense(192, 80, seed=4), blocksize=128, double_quant=double_quant).state_dict()
    for assign in (False, True):
        layer = NF4Linear(192, 80, blocksize=128, double_quant=double_quant, device="meta" if assign else None)
        result = layer.load_state_dict(dense.state_dict(), assign=assign)
        assert not result.missing_keys and not result.unexpected_keys
        got = layer.state_dict()
        assert list(got) == list(expected) and layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight"):
        NF4Linear(192, 81).load_state_dict(dense.state_dict())


def test_missing_quant_state_is_reported():
    sd = NF4Linear.from_linear(_dense(64, 32)).state_dict()
    del sd["weight.absmax"]
    with pytest.raises(RuntimeError, match="weight.absmax"):
        NF4Linear(64, 32).load_state_dict(sd)


def test_bnb_entries_round_trip_through_load_state_dict():
    w = _weight((40, 96), torch.bfloat16, 1)
    packed, state = quantize_nf4(w)
    bias = torch.randn(40)
    entries = {"weight." + name: value for name, value in bnb_entries(state).items()}
    sd = {"mlp.fc1.weight": packed, "mlp.fc1.bias": bias, **{"mlp.fc1." + k: v for k, v in entries.items()}}
    with torch.device("meta"):
        model = nn.Module()
        model.mlp = nn.Module()
        model.mlp.fc1, model.mlp.fc2 = NF4Linear(96, 40), NF4Linear(96, 40)
    result = model.load_state_dict(sd, strict=False, assign=True)
    assert "mlp.fc2.weight.quant_state.bitsandbytes__nf4" in result.missing_keys  # the dict holds fc1 only
    assert not [k for k in result.missing_keys if k.startswith("mlp.fc1.")] and not result.unexpected_keys
    layer = model.mlp.fc1
    packed2, state2, bias2 = layer.weight, layer.quant_state, layer.bias
    assert isinstance(state2, NF4State) and state2.shape == (40, 96) and state2.dtype == torch.bfloat16
    assert state2.offset == state.offset and torch.equal(bias2, bias)
    assert torch.equal(dequantize_nf4(packed2, state2), dequantize_nf4(packed, state))
    assert torch.equal(nf4_absmax(state2), nf4_absmax(state))
    moved = state.to("meta")
    assert moved.absmax.is_meta and moved.nested_code.is_meta and moved.offset == state.offset


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 64)
        self.qkv_proj = nn.Linear(64, 192, bias=False)
        self.fc = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.lm_head = nn.Linear(128, 50, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        h = self.fc(h + self.qkv_proj(h)[..., :64])
        return self.lm_head(self.norm(h))


def test_quantize_model_linears_and_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = _Tiny()
    replaced = quantize_model_linears(model)
    assert replaced == ["qkv_proj", "fc"]
    assert isinstance(model.fc, NF4Linear) and type(model.lm_head) is nn.Linear
    ids = torch.randint(0, 50, (2, 5))
    expected = model(ids)

    save_file(model.state_dict(), tmp_path / "model.safetensors")  # no shared storages
    with torch.device("meta"):
        fresh = _Tiny()
        quantize_model_linears(fresh)
    result = fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh(ids), expected)
