"""Numpy arrays through the tensor transport (transport/arrays.py): the decoder's frames, handed on without torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from mmserve import transport
from mmserve.transport import TensorRefError, from_ref
from mmserve.transport.arrays import as_bytes


@pytest.mark.parametrize("shape", [(4, 6, 10, 3), (2, 3)], ids=["shm", "inline"])
def test_numpy_arrays_travel_as_their_tensors_do(store, shape):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    ref = store.to_ref(x[:, ::-1])  # not contiguous: packed in order
    assert ref.WhichOneof("location") == ("shared_memory" if x.nbytes >= 1024 else "inline_data")
    assert ref.dtype == "uint8" and tuple(ref.shape) == shape
    assert torch.equal(from_ref(ref), torch.from_numpy(x[:, ::-1].copy()))
    assert torch.equal(from_ref(transport.to_inline(x)), torch.from_numpy(x))


def test_a_held_numpy_array_is_pulled_as_its_bytes(served):
    token = transport.caller_domain.set("another-host:1")
    x = np.arange(64 * 33, dtype=np.float32).reshape(64, 33)
    ref = served.to_ref(x)
    transport.caller_domain.reset(token)
    assert ref.WhichOneof("location") == "remote" and ref.remote.nbytes == x.nbytes
    assert bytes(as_bytes(served.claim(ref.remote.handle_id))) == x.tobytes()
    served.end_pull()


def test_arrays_of_dtypes_the_wire_does_not_carry_are_refused(store):
    with pytest.raises(TensorRefError, match="unsupported dtype complex64"):
        store.to_ref(np.zeros((64, 64), dtype=np.complex64))


def test_a_store_of_numpy_arrays_never_loads_torch():
    code = ("import sys, numpy as np\nfrom mmserve import transport\n"
            "store = transport.TensorStore('shm', inline_limit_bytes=16)\ntransport.install_store(store)\n"
            "for n in (8, 4096):\n    transport.to_ref(np.zeros(n, dtype=np.uint8))\nstore.close()\n"
            "assert 'torch' not in sys.modules, 'torch loaded'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
