"""Each op's contract (lightnet_ops/ops/<op>.py) is the one description of the op: the extension's
and the Triton backend's registered schemas must be its schema text, and every backend must
provide kernels for every op."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import lightnet_ops as lo
from lightnet_ops import backend_registry
from lightnet_ops.ops import CONTRACTS

needs_extension = pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"


def _registered(qualname: str) -> str:
    """The registered schema of lightnet_ops::<qualname>, without its name."""
    schema = str(getattr(torch.ops.lightnet_ops, qualname).default._schema)
    return schema[schema.index("("):]


def _normalised(schema_without_name: str) -> str:
    """The contract text as torch prints a parsed schema."""
    s = str(torch._C.parse_schema(f"lightnet_ops::x{schema_without_name}"))
    return s[s.index("("):]


@needs_extension
@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_extension_schemas_are_the_contracts(name):
    c = CONTRACTS[name]
    assert _registered(c.name) == _normalised(c.schema)
    assert _registered(c.backward_name) == _normalised(c.backward_schema)


def _source_schemas(path: pathlib.Path) -> list[str]:
    """The schemas an op's C++ file declares: each ``m.def(`` call's adjacent string literals, joined."""
    text = path.read_text()
    literals = r'"(?:[^"\\]|\\.)*"'
    calls = re.findall(rf"m\.def\(\s*((?:{literals}\s*)+)", text)
    return ["".join(lit[1:-1] for lit in re.findall(literals, call)) for call in calls]


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_op_source_declares_the_contracts_schemas(name):
    # Each op's schemas are declared in its own C++ file (csrc/<op>.cpp); checked without a build.
    c = CONTRACTS[name]
    declared = _source_schemas(CSRC / f"{name}.cpp")
    assert [_normalised(d[len(name):]) for d in declared if d.startswith(f"{name}(")] == [_normalised(c.schema)]
    backward = [d for d in declared if d.startswith(f"{c.backward_name}(")]
    assert [_normalised(d[len(c.backward_name):]) for d in backward] == [_normalised(c.backward_schema)]


@pytest.mark.skipif("triton" not in lo.backends(), reason="Triton cannot run here")
@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_triton_schemas_are_the_contracts(name):
    c = CONTRACTS[name]
    assert _registered(f"triton_{c.name}") == _normalised(c.schema)
    assert _registered(f"triton_{c.backward_name}") == _normalised(c.backward_schema)


@pytest.mark.parametrize("backend", [b for b in lo.backends() if b != "cuda" or torch.cuda.is_available()])
def test_every_backend_has_kernels_for_every_op(backend):
    impl = backend_registry.get(backend)
    assert set(impl.ops) == set(CONTRACTS)


def test_a_missing_op_is_a_clear_error():
    with pytest.raises(backend_registry.BackendUnavailableError, match="no kernels for no_such_op"):
        backend_registry.REFERENCE.kernels("no_such_op")


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_fakes_agree_with_the_reference(name):
    # The fake kernel's output metadata is what torch.compile plans with: it must be what runs.
    c = CONTRACTS[name]
    args = c.sample_args(torch.float32, torch.Generator().manual_seed(0))
    real = c.reference(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = c.fake(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    real, fake = (real if isinstance(real, tuple) else (real,)), (fake if isinstance(fake, tuple) else (fake,))
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype) == (f.shape, f.dtype)
