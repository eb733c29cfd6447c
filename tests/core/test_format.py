"""format: nested state <-> safetensors shards, exactly; shard planning; header validation."""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from ray_ckpt import CorruptCheckpointError
from ray_ckpt.core.format.buffers import DTYPE_PACKING, DTYPE_SIZE, DTYPE_TO_TORCH, to_buffer, to_tensor
from ray_ckpt.core.format.digests import Checksum
from ray_ckpt.core.format.header import MAX_HEADER_SIZE, read_safetensors_header
from ray_ckpt.core.format.hf_index import hf_index_bytes, parse_hf_index, plan_shards, shard_file_name
from ray_ckpt.core.format.safetensors_io import read_safetensors, write_safetensors
from ray_ckpt.core.format.tree import flatten_state, structure_keys, unflatten_state

DTYPES = sorted(DTYPE_TO_TORCH)
# Packed dtypes (F4: two values per byte) support few torch ops (no clone, no transpose): they get
# their own round trip below instead of the generic strategies.
UNPACKED = [d for d in DTYPES if d not in DTYPE_PACKING]
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Helpers: exact comparison and a full round trip through bytes, JSON and safe_open.
# ---------------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor's values (bit-exact, NaN payloads included)."""
    # clone to fresh default strides: a lone element can keep any stride even when "contiguous"
    t = t.detach().resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)
    if t.numel() == 0:
        return b""
    return bytes(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def assert_same(a: Any, b: Any, path: str = "<root>") -> None:
    """Structural, type-exact, bit-exact equality."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype, (path, a.dtype, b.dtype)
        assert tuple(a.shape) == tuple(b.shape), (path, a.shape, b.shape)
        assert tensor_bytes(a) == tensor_bytes(b), path
        return
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        assert [type(k) for k in a] == [type(k) for k in b], path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, (float, np.floating)):
        if math.isnan(a):
            assert math.isnan(b), path
        else:
            assert a == b and math.copysign(1, a) == math.copysign(1, b), (path, a, b)
    else:
        assert a == b, (path, a, b)


def write_file(path: Path, state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """flatten -> write_safetensors to a real file; returns (flat, what safe_open reads)."""
    flat = flatten_state(state)
    with open(path, "wb") as f:
        digest = write_safetensors(f, flat.tensors, list(flat.tensors))
    data = path.read_bytes()
    assert digest.size == len(data)
    checksum = Checksum()
    checksum.update(data)
    assert digest.checksum == checksum.hexdigest()
    with safe_open(str(path), "pt") as sf:
        assert set(sf.keys()) == set(flat.tensors)
        assert sf.metadata() == {"format": "pt"}
        from_safetensors = {k: sf.get_tensor(k) for k in sf.keys()}
    return flat, from_safetensors


def roundtrip(path: Path, state: Any) -> Any:
    """The full journey: flatten, write, read (ours and safe_open), JSON-encode the structure, rebuild."""
    flat, from_safetensors = write_file(path, state)
    size = path.stat().st_size
    with open(path, "rb") as f:
        tensors = read_safetensors(f, name=str(path), file_size=size, expected_checksum=_checksum(path))
    assert set(tensors) == set(flat.tensors)
    for key, t in tensors.items():
        assert_same(to_tensor(flat.tensors[key]), t, key)
        assert_same(t, from_safetensors[key], key)
    structure = json.loads(json.dumps(flat.structure, allow_nan=False))  # must be strict JSON
    aliases = json.loads(json.dumps(flat.aliases))
    assert set(structure_keys(structure)) <= set(tensors) | set(aliases)
    return unflatten_state(tensors, structure, aliases)


def _checksum(path: Path) -> str:
    c = Checksum()
    c.update(path.read_bytes())
    return c.hexdigest()


# ---------------------------------------------------------------------------------------------
# Strategies.
# ---------------------------------------------------------------------------------------------
@st.composite
def tensors(draw: st.DrawFn, dtypes: list[str] = UNPACKED) -> torch.Tensor:
    name = draw(st.sampled_from(dtypes))
    dtype = DTYPE_TO_TORCH[name]
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    numel = math.prod(shape)
    raw = draw(st.binary(min_size=numel * DTYPE_SIZE[name], max_size=numel * DTYPE_SIZE[name]))
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    u8 = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if dtype == torch.bool:
        u8 = u8 % 2
    t = u8.view(dtype).reshape(shape)
    view = draw(st.sampled_from(["plain", "transpose", "stride", "offset"]))
    if view == "transpose" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif view == "stride" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[::2]
    elif view == "offset" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[1:]
    return t


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
)
keys = st.one_of(
    st.text(max_size=6), st.integers(-5, 5), st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False)
)
values = st.recursive(
    st.one_of(scalars, tensors()),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=3),
    ),
    max_leaves=10,
)
states = st.dictionaries(keys, values, min_size=1, max_size=4)


# ---------------------------------------------------------------------------------------------
# Round-trip properties.
# ---------------------------------------------------------------------------------------------
@FAST
@given(state=states)
def test_nested_state_roundtrips_exactly(tmp_path_factory: pytest.TempPathFactory, state: dict) -> None:
    path = tmp_path_factory.mktemp("rt") / "state.safetensors"
    assert_same(state, roundtrip(path, state))


@FAST
@given(flat_state=st.dictionaries(st.text(min_size=1, max_size=10), tensors(), min_size=1, max_size=6))
def test_flat_state_dict_roundtrips_exactly(tmp_path_factory: pytest.TempPathFactory, flat_state: dict) -> None:
    path = tmp_path_factory.mktemp("rt") / "flat.safetensors"
    flat = flatten_state(flat_state)
    assert flat.structure is None  # a plain {str: tensor} dict needs no structure
    out = roundtrip(path, flat_state)
    assert set(out) == set(flat_state)
    for key, value in flat_state.items():
        assert_same(value, out[key], key)


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (3, 0, 2), (2, 3, 4)])
def test_every_dtype_and_shape_roundtrips(tmp_path: Path, name: str, shape: tuple[int, ...]) -> None:
    dtype = DTYPE_TO_TORCH[name]
    numel = math.prod(shape)
    gen = torch.Generator().manual_seed(hash((name, shape)) % 2**31)
    raw = torch.randint(0, 256, (numel * DTYPE_SIZE[name],), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    t = raw.view(dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)
    if name in DTYPE_PACKING:
        if not shape:
            with pytest.raises(TypeError, match="0-d"):
                flatten_state({"t": t})
            return
        # few torch ops exist for packed dtypes (and safetensors' own torch loader lacks them):
        # written by us, read back by us, compared as raw bytes; the header counts F4 values
        path = tmp_path / "x.safetensors"
        with open(path, "wb") as f:
            write_safetensors(f, flatten_state({"t": t}).tensors, ["t"])
        with open(path, "rb") as f:
            header = read_safetensors_header(f, name="x", file_size=path.stat().st_size)
            assert header.entries["t"]["shape"][-1] == shape[-1] * DTYPE_PACKING[name]
            f.seek(0)
            out = read_safetensors(f, name="x", file_size=path.stat().st_size)
        assert out["t"].dtype == dtype and out["t"].shape == t.shape
        assert tensor_bytes(out["t"].view(torch.uint8)) == tensor_bytes(t.view(torch.uint8))
        return
    state = {"t": t, "nested": {"t": t.T if t.dim() == 2 else t}}
    assert_same(state, roundtrip(tmp_path / "x.safetensors", state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_special_float_values_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, 3.5], dtype=torch.float64).to(dtype)
    t.view(torch.uint8)  # sanity: viewable
    payload = t.clone()
    # a NaN with an unusual payload/sign must keep its exact bits
    payload.view(torch.uint8)[0] ^= 1
    state = {"t": t, "payload": payload}
    assert_same(state, roundtrip(tmp_path / "f.safetensors", state))


def test_views_and_non_contiguous(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {
        "transposed": base.T,
        "strided": base[:, ::3],
        "offset": base[2:4],
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "conj": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),
        "neg": torch.tensor([1 + 2j], dtype=torch.complex64).conj().imag,
        "channels_last": torch.arange(24.0).reshape(1, 2, 3, 4).to(memory_format=torch.channels_last),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "requires_grad": torch.ones(2, requires_grad=True),
    }
    out = roundtrip(tmp_path / "v.safetensors", state)
    for key, value in state.items():
        assert torch.equal(value.detach().resolve_conj().resolve_neg(), out[key]), key
        assert_same(value, out[key], key)


def test_tied_tensors_are_written_once_and_come_back_tied(tmp_path: Path) -> None:
    emb = torch.randn(10, 4)
    state = {"wte.weight": emb, "block.w": torch.randn(4, 4), "lm_head.weight": emb}
    flat = flatten_state(state)
    assert list(flat.tensors) == ["wte.weight", "block.w"]
    assert flat.aliases == {"lm_head.weight": "wte.weight"}
    assert flat.total_size == (40 + 16) * 4
    out = roundtrip(tmp_path / "tied.safetensors", state)
    assert out["lm_head.weight"] is out["wte.weight"]
    assert torch.equal(out["lm_head.weight"], emb)
    with safe_open(str(tmp_path / "tied.safetensors"), "pt") as sf:
        assert sorted(sf.keys()) == ["block.w", "wte.weight"]


def test_tied_tensors_in_nested_state(tmp_path: Path) -> None:
    w = torch.randn(3, 3)
    state = {"model": {"a": w, "b": [w, w.T]}, "opt": ({"w": w}, w.T)}
    out = roundtrip(tmp_path / "tn.safetensors", state)
    assert_same(state, out)
    assert out["model"]["a"] is out["model"]["b"][0] is out["opt"][0]["w"]
    assert out["model"]["b"][1] is out["opt"][1]  # the same transposed view, stored once


def test_different_views_of_one_storage_are_not_merged(tmp_path: Path) -> None:
    w = torch.arange(12, dtype=torch.float32)
    state = {"full": w, "first": w[:6], "reshaped": w.view(3, 4)}
    flat = flatten_state(state)
    assert flat.aliases == {}
    assert_same(state, roundtrip(tmp_path / "views.safetensors", state))


def test_key_path_collisions_get_unique_keys(tmp_path: Path) -> None:
    state = {"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}, 1: torch.full((1,), 2.0), "1": torch.full((1,), 3.0)}
    flat = flatten_state(state)
    assert len(flat.tensors) == 4
    assert_same(state, roundtrip(tmp_path / "c.safetensors", state))


def test_optimizer_state_roundtrips(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    state = {
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1], "py_seed": 1234},
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "np_scalars": [np.float32(1.5), np.int64(-3), np.float64("nan"), np.bool_(True)],
        "bytes": b"\x00\xff",
        "floats": [float("nan"), float("inf"), -float("inf"), -0.0],
    }
    out = roundtrip(tmp_path / "opt.safetensors", state)
    assert_same(state, out)
    assert out["dtype"] is torch.bfloat16
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(out["optimizer"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_numpy_arrays_come_back_as_numpy(tmp_path: Path) -> None:
    arr = np.arange(6, dtype=np.int16).reshape(2, 3)
    state = {"arr": arr, "f": np.array([np.nan, 1.0], dtype=np.float32), "t": arr.T}
    flat = flatten_state(state)
    assert flat.structure is not None
    assert_same(state, roundtrip(tmp_path / "np.safetensors", state))


# ---------------------------------------------------------------------------------------------
# What cannot be stored raises TypeError naming the key path.
# ---------------------------------------------------------------------------------------------
class Opaque:
    pass


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"w": torch.ones(1), "bad": Opaque()}, "bad"),
        ({"opt": {"state": {0: {"step": Opaque()}}}}, "opt.state.0.step"),
        ({"list": [1, 2, {"x": {1, 2}}]}, "list.2.x"),
        ({"tup": (1, lambda: 0)}, "tup.1"),
        ({"d": {(1, 2): torch.ones(1)}}, "d"),
        ({"obj": np.array([object()], dtype=object)}, "obj"),
        ({"sparse": torch.ones(2, 2).to_sparse()}, "sparse"),
        ({"c128": torch.ones(2, dtype=torch.complex128)}, "c128"),
        ({"deep": {"er": [{"x": 1j}]}}, "deep.er.0.x"),
    ],
)
def test_unstorable_values_raise_type_error_naming_the_key(state: dict, path: str) -> None:
    with pytest.raises(TypeError) as excinfo:
        flatten_state(state, what="trainer_state")
    assert path in str(excinfo.value)


def test_non_mapping_state_is_refused() -> None:
    with pytest.raises(TypeError, match="state_dict: expected a mapping"):
        flatten_state([torch.ones(1)])  # type: ignore[arg-type]


def test_nothing_is_pickled(tmp_path: Path) -> None:
    flat = flatten_state({"a": {"b": [1, "x", None, torch.ones(1)]}})
    text = json.dumps(flat.structure)
    assert "pickle" not in text and "__reduce__" not in text


# ---------------------------------------------------------------------------------------------
# Buffers.
# ---------------------------------------------------------------------------------------------
def test_to_buffer_is_zero_copy_for_contiguous_tensors() -> None:
    t = torch.arange(8, dtype=torch.float32)
    buf = to_buffer(t)
    assert buf.data.ctypes.data == t.data_ptr()
    assert to_tensor(buf).data_ptr() == t.data_ptr()
    assert buf.nbytes == 32 and buf.shape == (8,) and buf.dtype == "F32"
    assert buf.same_contents(to_buffer(t.clone()))
    assert not buf.same_contents(to_buffer(t + 1))


def test_write_streams_buffers_without_copying(tmp_path: Path) -> None:
    """write_safetensors hands the tensors' own memory to the file: header first, then buffers."""
    big = torch.arange(1000, dtype=torch.float64)
    small = torch.arange(10, dtype=torch.int8)
    flat = flatten_state({"small": small, "big": big})
    seen: list[Any] = []

    class Recorder(io.BytesIO):
        def write(self, data: Any) -> int:
            seen.append(data)
            return super().write(data)

    f = Recorder()
    write_safetensors(f, flat.tensors, ["small", "big"])
    assert len(seen) == 3  # header, then one write per tensor (largest element size first)
    assert memoryview(seen[1]).nbytes == 8000
    assert np.frombuffer(memoryview(seen[1]), dtype=np.uint8).ctypes.data == big.data_ptr()


def test_reads_files_written_by_safetensors_itself(tmp_path: Path) -> None:
    state = {"a": torch.randn(3, 2), "b": torch.arange(5, dtype=torch.int32), "c": torch.tensor(True)}
    path = tmp_path / "theirs.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "k": "v"})
    with open(path, "rb") as f:
        out = read_safetensors(f, name="theirs", file_size=path.stat().st_size)
    assert_same(state, {k: out[k] for k in state})
    with open(path, "rb") as f:
        header = read_safetensors_header(f, name="theirs", file_size=path.stat().st_size)
    assert header.metadata == {"format": "pt", "k": "v"}


def test_loaded_tensors_own_their_storage(tmp_path: Path) -> None:
    """Like safetensors' loader: no views into one big buffer (torch.set_rng_state ignores offsets)."""
    rng = torch.get_rng_state()
    expected = torch.rand(3)
    state = {"pad": torch.ones(3, dtype=torch.int8), "rng": rng, "w": torch.randn(4, 4)}
    path = tmp_path / "own.safetensors"
    write_file(path, state)
    with open(path, "rb") as f:
        out = read_safetensors(f, name="own", file_size=path.stat().st_size, expected_checksum=_checksum(path))
    for key, t in out.items():
        assert t.storage_offset() == 0, key
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), key
    torch.set_rng_state(out["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_bytes_between_tensors_are_checksummed(tmp_path: Path) -> None:
    """A file from elsewhere may leave gaps between tensors: the checksum still covers every byte."""
    blob = _file_with_header(
        {
            "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
            "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]},
        },
        b"\x01\x02\xaa\xbb\x03\x04\xcc",
    )
    c = Checksum()
    c.update(blob)
    out = read_safetensors(io.BytesIO(blob), name="gap", file_size=len(blob), expected_checksum=c.hexdigest())
    assert out["a"].tolist() == [1, 2] and out["b"].tolist() == [3, 4]
    tampered = blob[:-1] + b"\x00"  # a trailing byte no tensor claims
    with pytest.raises(CorruptCheckpointError, match="gap: checksum mismatch"):
        read_safetensors(io.BytesIO(tampered), name="gap", file_size=len(blob), expected_checksum=c.hexdigest())


def test_partial_read_by_keys(tmp_path: Path) -> None:
    state = {f"k{i}": torch.full((i + 1,), float(i)) for i in range(5)}
    flat, _ = write_file(tmp_path / "p.safetensors", state)
    with open(tmp_path / "p.safetensors", "rb") as f:
        size = (tmp_path / "p.safetensors").stat().st_size
        out = read_safetensors(f, name="p", file_size=size, keys=["k3", "k1", "zz"])
    assert list(out) == ["k3", "k1"]
    assert_same(out["k3"], state["k3"])


def test_checksum_mismatch_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    write_file(path, {"a": torch.ones(4)})
    with open(path, "rb") as f, pytest.raises(CorruptCheckpointError, match="c.safetensors: checksum mismatch"):
        read_safetensors(f, name="c.safetensors", file_size=path.stat().st_size, expected_checksum="xxh3_64:0")


# ---------------------------------------------------------------------------------------------
# Shard planning and the Hugging Face index.
# ---------------------------------------------------------------------------------------------
def _plan(
    sizes: list[tuple[str, int]], limit: int, groups: list[list[tuple[str, int]]] | None = None
) -> list[list[str]]:
    return [s.keys for s in plan_shards(groups if groups is not None else [sizes], limit)]


def test_plan_fills_to_exactly_the_limit() -> None:
    assert _plan([("a", 10), ("b", 10), ("c", 10)], 20) == [["a", "b"], ["c"]]
    assert _plan([("a", 10), ("b", 11)], 21) == [["a", "b"]]


def test_plan_one_byte_over_starts_a_new_shard() -> None:
    assert _plan([("a", 10), ("b", 11)], 20) == [["a"], ["b"]]
    assert _plan([("a", 20), ("b", 1)], 20) == [["a"], ["b"]]


def test_plan_tensor_bigger_than_limit_gets_its_own_shard() -> None:
    assert _plan([("a", 5), ("big", 100), ("b", 5)], 10) == [["a"], ["big"], ["b"]]
    assert _plan([("big", 100)], 10) == [["big"]]
    assert _plan([("big1", 100), ("big2", 100)], 10) == [["big1"], ["big2"]]
    assert _plan([("exact", 10), ("z", 0)], 10) == [["exact", "z"]]


def test_plan_keeps_key_order() -> None:
    sizes = [(f"k{i}", s) for i, s in enumerate([3, 9, 1, 1, 7, 2, 8, 5])]
    shards = _plan(sizes, 10)
    assert [k for shard in shards for k in shard] == [k for k, _ in sizes]
    size = dict(sizes)
    assert all(sum(size[k] for k in shard) <= 10 for shard in shards)
    assert shards == [["k0"], ["k1", "k2"], ["k3", "k4", "k5"], ["k6"], ["k7"]]


def test_plan_groups_start_new_shards() -> None:
    groups = [[("r0.a", 4), ("r0.b", 4)], [("r1.a", 1)], [], [("r3.a", 2), ("r3.b", 9)]]
    assert _plan([], 100, groups) == [["r0.a", "r0.b"], ["r1.a"], ["r3.a", "r3.b"]]
    assert _plan([], 10, groups) == [["r0.a", "r0.b"], ["r1.a"], ["r3.a"], ["r3.b"]]


def test_plan_names_follow_hugging_face() -> None:
    specs = plan_shards([[("a", 5), ("b", 5), ("c", 5)]], 5)
    assert [s.name for s in specs] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert [s.name for s in plan_shards([[("a", 5)]], 5)] == ["model.safetensors"]
    assert [s.name for s in plan_shards([], 5)] == ["model.safetensors"]
    assert shard_file_name(1, 2, "pytorch_model", "bin") == "pytorch_model-00002-of-00002.bin"


@FAST
@given(
    sizes=st.lists(st.integers(0, 50), min_size=1, max_size=30),
    limit=st.integers(1, 60),
)
def test_plan_properties(sizes: list[int], limit: int) -> None:
    items = [(f"k{i}", s) for i, s in enumerate(sizes)]
    shards = _plan(items, limit)
    assert [k for shard in shards for k in shard] == [k for k, _ in items]  # every key once, in order
    size = dict(items)
    for i, shard in enumerate(shards):
        total = sum(size[k] for k in shard)
        assert total <= limit or len(shard) == 1  # only a lone oversized tensor may exceed the limit
        if i + 1 < len(shards):  # greedy: the next shard's first tensor did not fit
            assert total + size[shards[i + 1][0]] > limit


def test_hf_index_schema() -> None:
    specs = plan_shards([[("a", 8), ("b", 8), ("c", 4)]], 10)
    index = json.loads(hf_index_bytes(specs, 20))
    assert index == {
        "metadata": {"total_size": 20},
        "weight_map": {
            "a": "model-00001-of-00003.safetensors",
            "b": "model-00002-of-00003.safetensors",
            "c": "model-00003-of-00003.safetensors",
        },
    }
    assert parse_hf_index(hf_index_bytes(specs, 20), name="i.json") == index["weight_map"]


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[]", b"{}", b'{"weight_map": []}', b'{"weight_map": {"a": 1}}', b'{"weight_map": {"a": null}}'],
)
def test_malformed_hf_index_names_the_file(data: bytes) -> None:
    with pytest.raises(CorruptCheckpointError, match="step_000000001/model.safetensors.index.json") as excinfo:
        parse_hf_index(data, name="step_000000001/model.safetensors.index.json")
    assert excinfo.value.path == "step_000000001/model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# Header validation.
# ---------------------------------------------------------------------------------------------
def _file_with_header(header: Any, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def _read(blob: bytes, name: str = "shard.safetensors") -> dict[str, torch.Tensor]:
    return read_safetensors(io.BytesIO(blob), name=name, file_size=len(blob))


def _valid_blob() -> bytes:
    flat = flatten_state({"a": torch.arange(4, dtype=torch.float32), "b": torch.arange(3, dtype=torch.int16)})
    f = io.BytesIO()
    write_safetensors(f, flat.tensors, list(flat.tensors))
    return f.getvalue()


CORRUPT_BLOBS = {
    "empty file": b"",
    "shorter than the length prefix": b"\x10\x00\x00",
    "header length past the file": struct.pack("<Q", 1000) + b"{}",
    "header length too big": struct.pack("<Q", MAX_HEADER_SIZE + 1) + b"{}" + b" " * 64,
    "header length 2**64-1": b"\xff" * 8 + b"{}",
    "bad json": _file_with_header(None, raw=b"{not json!"),
    "json not an object": _file_with_header([1, 2]),
    "unknown dtype": _file_with_header({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16),
    "missing dtype": _file_with_header({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "entry not an object": _file_with_header({"a": [1, 2, 3]}, b"\0" * 4),
    "negative dim": _file_with_header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}),
    "offsets past the file end": _file_with_header(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8
    ),
    "offsets reversed": _file_with_header({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, b"\0" * 8),
    "offsets not ints": _file_with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, b"\0" * 4),
    "size does not match shape": _file_with_header(
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "overlapping": _file_with_header(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    ),
    "truncated data": _valid_blob()[:-3],
}


@pytest.mark.parametrize("what", list(CORRUPT_BLOBS))
def test_corrupt_headers_raise_naming_the_file(what: str) -> None:
    blob = CORRUPT_BLOBS[what]
    with pytest.raises(CorruptCheckpointError) as excinfo:
        _read(blob, name="step_000000007/model-00002-of-00003.safetensors")
    assert "step_000000007/model-00002-of-00003.safetensors" in str(excinfo.value)
    assert excinfo.value.path == "step_000000007/model-00002-of-00003.safetensors"


def test_file_size_larger_than_the_bytes_read_is_truncation() -> None:
    blob = _valid_blob()
    with pytest.raises(CorruptCheckpointError, match="x.safetensors: truncated"):
        read_safetensors(io.BytesIO(blob), name="x.safetensors", file_size=len(blob) + 4)


def test_valid_blob_reads() -> None:
    out = _read(_valid_blob())
    assert torch.equal(out["a"], torch.arange(4, dtype=torch.float32))
    assert torch.equal(out["b"], torch.arange(3, dtype=torch.int16))


def test_written_layout_is_aligned_and_padded(tmp_path: Path) -> None:
    state = {
        "i8": torch.ones(3, dtype=torch.int8),
        "f64": torch.ones(3, dtype=torch.float64),
        "b": torch.ones(1, dtype=torch.bool),
    }
    flat = flatten_state(state)
    f = io.BytesIO()
    write_safetensors(f, flat.tensors, list(flat.tensors))
    blob = f.getvalue()
    (length,) = struct.unpack("<Q", blob[:8])
    assert (8 + length) % 8 == 0
    header = json.loads(blob[8 : 8 + length])
    for entry in (v for k, v in header.items() if k != "__metadata__"):
        begin = entry["data_offsets"][0]
        size = DTYPE_SIZE[entry["dtype"]]
        assert begin % size == 0
